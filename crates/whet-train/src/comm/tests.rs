use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::rendezvous::{EnvRendezvous, share_from_rank0};
use super::*;

#[test]
fn buckets_group_consecutive_parameters_up_to_the_cap() {
    assert_eq!(plan_buckets(&[], 10), Vec::<Range<usize>>::new());
    assert_eq!(plan_buckets(&[4, 4, 4], 10), vec![0..2, 2..3]);
    assert_eq!(plan_buckets(&[4, 6, 1], 10), vec![0..2, 2..3]);
    // A tensor larger than the cap gets a bucket of its own; nothing is split or lost.
    assert_eq!(plan_buckets(&[3, 25, 2, 2], 10), vec![0..1, 1..2, 2..4]);
    assert_eq!(plan_buckets(&[5, 5, 5], 1_000), vec![0..3]);
    for cap in 1..20 {
        let numels = [7, 1, 3, 12, 2, 2, 9];
        let plan = plan_buckets(&numels, cap);
        let covered: Vec<usize> = plan.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..numels.len()).collect::<Vec<_>>(), "cap {cap}");
        for r in &plan {
            let n: usize = numels[r.clone()].iter().sum();
            assert!(
                n <= cap || r.len() == 1,
                "cap {cap}: bucket {r:?} holds {n}"
            );
        }
    }
}

/// A communicator whose ranks report fixed values: what `sum_over_ranks` and `agree` see from
/// `world` ranks.
struct Fixed {
    rank: usize,
    per_rank: Vec<Vec<f64>>,
}

impl Communicator for Fixed {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.per_rank.len()
    }
    fn backend(&self) -> &'static str {
        "fixed"
    }
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>> {
        assert_eq!(values, &self.per_rank[self.rank][..]);
        Ok(self.per_rank.concat())
    }
    fn all_reduce_sum(&self, _: &[Tensor]) -> Result<Vec<Tensor>> {
        unreachable!()
    }
    fn abort(&self, code: i32) -> ! {
        panic!("abort({code})")
    }
}

#[test]
fn host_sums_are_added_in_rank_order_and_equal_on_every_rank() {
    let per_rank = vec![vec![1e16, 3.0], vec![1.0, 4.0], vec![-1e16, 5.0]];
    let sums: Vec<Vec<f64>> = (0..3)
        .map(|rank| {
            let mine = per_rank[rank].clone();
            let comm = Fixed {
                rank,
                per_rank: per_rank.clone(),
            };
            sum_over_ranks(&comm, &mine).unwrap()
        })
        .collect();
    // ((1e16 + 1) + -1e16) in f64 is 0 or 2 depending on order; rank order gives 0 on all ranks.
    assert_eq!(sums[0], vec![(1e16 + 1.0) + -1e16, 12.0]);
    assert!(sums.iter().all(|s| s == &sums[0]), "{sums:?}");
}

#[test]
fn disagreeing_ranks_get_the_same_clear_error() {
    let item = |v: f64| Agreement {
        what: "the step to resume from",
        value: v,
        hint: "share output.dir",
    };
    let per_rank = vec![vec![5.0], vec![5.0], vec![3.0]];
    for rank in 0..3 {
        let comm = Fixed {
            rank,
            per_rank: per_rank.clone(),
        };
        let err = agree(&comm, &[item(per_rank[rank][0])])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the ranks disagree on the step to resume from: rank 0 has 5, rank 2 has 3. share output.dir"
        );
    }
    let same = Fixed {
        rank: 1,
        per_rank: vec![vec![5.0], vec![5.0]],
    };
    agree(&same, &[item(5.0)]).unwrap();
}

#[test]
fn rendezvous_variables_are_read_and_checked() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(
        EnvRendezvous::from_vars(vars(&[("RANK", "1")])).unwrap(),
        None
    );
    let r = EnvRendezvous::from_vars(vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node7"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        r,
        EnvRendezvous {
            rank: 3,
            world_size: 8,
            local_rank: 1,
            master: "node7:29500".into()
        }
    );
    let err = EnvRendezvous::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("RANK=2 with WORLD_SIZE=2"), "{err}");
    let err = EnvRendezvous::from_vars(vars(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_PORT", "http"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("MASTER_PORT=\"http\""), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bootstrap of NCCL without MPI: rank 0's bytes reach every rank over TCP, whichever starts
/// first.
#[test]
fn rank_zero_shares_bytes_with_every_rank_over_tcp() {
    let master = format!("127.0.0.1:{}", free_port());
    let payload: Vec<u8> = (0..128u8).rev().collect();
    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let (master, payload) = (master.clone(), payload.clone());
                s.spawn(move || {
                    if rank == 0 {
                        // The others start first and retry until rank 0 listens.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    share_from_rank0(
                        rank,
                        4,
                        &master,
                        (rank == 0).then_some(&payload[..]),
                        Duration::from_secs(20),
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| r == &payload));
}

#[test]
fn a_rank_with_another_world_size_is_refused_on_both_sides() {
    let master = format!("127.0.0.1:{}", free_port());
    let (zero, one) = std::thread::scope(|s| {
        let m = master.clone();
        let zero =
            s.spawn(move || share_from_rank0(0, 2, &m, Some(&[1, 2, 3]), Duration::from_secs(20)));
        let one = s.spawn(|| share_from_rank0(1, 3, &master, None, Duration::from_secs(20)));
        (zero.join().unwrap(), one.join().unwrap())
    });
    let zero = zero.unwrap_err().to_string();
    assert!(
        zero.contains("WORLD_SIZE=3") && zero.contains("rank 0 of 2"),
        "{zero}"
    );
    let one = one.unwrap_err().to_string();
    assert!(
        one.contains("rank 1 of 3") && one.contains("refused"),
        "{one}"
    );
}

/// A peer posing as rank 0 announces 2^64 - 1 bytes: the rank refuses before allocating
/// (it used to `vec![0; len]` the announced length: a capacity-overflow panic, or an abort on
/// allocation for a large but addressable length).
#[test]
fn a_huge_announced_payload_is_refused_before_allocating() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let master = listener.local_addr().unwrap().to_string();
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; 24];
            stream.read_exact(&mut hello).unwrap();
            let mut reply = b"whet-rdv".to_vec();
            reply.push(1);
            reply.extend_from_slice(&u64::MAX.to_le_bytes());
            stream.write_all(&reply).unwrap();
        });
        share_from_rank0(1, 2, &master, None, Duration::from_secs(20))
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("announced 18446744073709551615 bytes") && err.contains("65536"),
        "{err}"
    );
    // Rank 0 does not send more than a rank accepts either.
    let big = vec![0u8; (1 << 16) + 1];
    let err = share_from_rank0(0, 2, &master, Some(&big), Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(err.contains("65537 bytes to share"), "{err}");
}

#[test]
fn rank_zero_gives_up_when_a_rank_never_comes() {
    let master = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = share_from_rank0(0, 3, &master, Some(&[0]), Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only 0 of the 2 other ranks connected"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_watchdog_fires_on_a_collective_that_never_ends_and_only_then() {
    let fired: Arc<Mutex<Option<(String, Duration)>>> = Arc::default();
    let seen = Arc::clone(&fired);
    let dog = Watchdog::start(Duration::from_millis(200), move |what, waited| {
        *seen.lock().unwrap() = Some((what.to_string(), waited));
    });
    // Collectives that end in time: nothing happens.
    for _ in 0..5 {
        let _g = dog.watch(|| "quick all-reduce".into());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(400));
    assert!(fired.lock().unwrap().is_none(), "fired between collectives");
    // One that hangs.
    let _g = dog.watch(|| "all-reduce of 3 gradient buckets".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fired.lock().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (what, waited) = fired.lock().unwrap().clone().expect("the watchdog fired");
    assert_eq!(what, "all-reduce of 3 gradient buckets");
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    let msg = watchdog::timeout_message(1, 4, "mpi", &what, waited);
    assert!(
        msg.starts_with("error: rank 1 of 4 (mpi): all-reduce of 3 gradient buckets has waited")
    );
}
