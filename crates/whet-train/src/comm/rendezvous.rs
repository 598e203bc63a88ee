//! Bootstrap without MPI: the ranks named by `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` (the variables `torchrun` and most Slurm scripts set) fetch a few bytes from
//! rank 0 over TCP. NCCL's unique id travels this way when no MPI launcher is there.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Result, TrainError};

/// The default `MASTER_PORT`, as torchrun's.
pub const DEFAULT_PORT: u16 = 29500;
const MAGIC: &[u8; 8] = b"whet-rdv";
/// The most bytes rank 0 may share (NCCL's unique id is 128): a length read from the network is
/// checked against it before anything is allocated.
pub const MAX_PAYLOAD: usize = 1 << 16;

/// This process's place in a launch described by environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRendezvous {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens.
    pub master: String,
}

impl EnvRendezvous {
    /// `Some` when `RANK` and `WORLD_SIZE` are both set; an error when they are malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`EnvRendezvous::from_env`] over any source of variables.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let var = |k: &str| lookup(k).map(|v| v.trim().to_string());
        let (Some(rank), Some(world)) = (var("RANK"), var("WORLD_SIZE")) else {
            return Ok(None);
        };
        let bad = |message: String| TrainError::Launch { message };
        let num = |k: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(format!("{k}={v:?} is not a number")))
        };
        let (rank, world_size) = (num("RANK", &rank)?, num("WORLD_SIZE", &world)?);
        if world_size == 0 || rank >= world_size {
            return Err(bad(format!(
                "RANK={rank} with WORLD_SIZE={world_size}: the rank must be below the world size"
            )));
        }
        let local_rank = match ["LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"]
            .iter()
            .find_map(|k| Some((*k, var(k)?)))
        {
            Some((k, v)) => num(k, &v)?,
            None => 0,
        };
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = match var("MASTER_PORT") {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad(format!("MASTER_PORT={p:?} is not a port number")))?,
            None => DEFAULT_PORT,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master: format!("{addr}:{port}"),
        }))
    }
}

/// Rank 0 hands `payload` to every other rank; every rank returns it. Rank 0 listens on the port
/// of `master` (all interfaces) until the `world_size - 1` others have connected; the others
/// connect to `master`, retrying until `timeout` (rank 0 may start later). A peer that announces
/// another world size is refused, with an error on both sides.
pub fn share_from_rank0(
    rank: usize,
    world_size: usize,
    master: &str,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let fail = |message: String| TrainError::Comm {
        rank,
        world: world_size,
        backend: "tcp rendezvous",
        op: format!("exchange with rank 0 at {master}"),
        message,
    };
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let payload = payload.ok_or_else(|| fail("rank 0 has nothing to share".into()))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(fail(format!(
                "{} bytes to share, more than the rendezvous carries ({MAX_PAYLOAD})",
                payload.len()
            )));
        }
        let port = master
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| fail("MASTER_ADDR:MASTER_PORT has no port".into()))?;
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| fail(format!("cannot listen on port {port}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let mut served = 0;
        while served + 1 < world_size {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(30))))
                        .map_err(|e| fail(e.to_string()))?;
                    let mut hello = [0u8; 24];
                    stream
                        .read_exact(&mut hello)
                        .map_err(|e| fail(format!("reading the hello of {peer}: {e}")))?;
                    let (their_rank, their_world) = parse_hello(&hello)
                        .ok_or_else(|| fail(format!("{peer} is not a whet rank")))?;
                    let ok = their_world == world_size;
                    let mut reply = Vec::with_capacity(payload.len() + 17);
                    reply.extend_from_slice(MAGIC);
                    reply.push(ok as u8);
                    reply.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                    reply.extend_from_slice(payload);
                    stream
                        .write_all(&reply)
                        .map_err(|e| fail(format!("answering rank {their_rank}: {e}")))?;
                    if !ok {
                        return Err(fail(format!(
                            "rank {their_rank} ({peer}) has WORLD_SIZE={their_world}, this rank \
                             has {world_size}: every process needs the same WORLD_SIZE"
                        )));
                    }
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(fail(format!(
                            "only {served} of the {} other ranks connected within {} s; start \
                             every rank with the same MASTER_ADDR/MASTER_PORT",
                            world_size - 1,
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accepting a rank: {e}"))),
            }
        }
        return Ok(payload.to_vec());
    }
    let addrs: Vec<_> = master
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve {master}: {e}")))?
        .collect();
    let connect = || -> std::io::Result<TcpStream> {
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{master} resolves to no address"),
        );
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let mut stream = loop {
        match connect() {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(fail(format!(
                    "rank 0 did not answer within {} s: {e}",
                    timeout.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| fail(e.to_string()))?;
    let mut hello = Vec::with_capacity(24);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world_size as u64).to_le_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| fail(format!("sending this rank's hello: {e}")))?;
    let mut head = [0u8; 17];
    stream
        .read_exact(&mut head)
        .map_err(|e| fail(format!("reading rank 0's answer: {e}")))?;
    if &head[..8] != MAGIC {
        return Err(fail(format!("{master} is not a whet rank 0")));
    }
    if head[8] != 1 {
        return Err(fail(format!(
            "rank 0 refused this rank: its WORLD_SIZE differs from this rank's {world_size}"
        )));
    }
    let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
    let len = match usize::try_from(len) {
        Ok(len) if len <= MAX_PAYLOAD => len,
        _ => {
            return Err(fail(format!(
                "rank 0 announced {len} bytes, more than a rendezvous carries ({MAX_PAYLOAD}); \
                 is {master} a whet rank 0 of this build?"
            )));
        }
    };
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(|e| fail(format!("reading the shared bytes: {e}")))?;
    Ok(payload)
}

fn parse_hello(hello: &[u8; 24]) -> Option<(usize, usize)> {
    if &hello[..8] != MAGIC {
        return None;
    }
    let rank = u64::from_le_bytes(hello[8..16].try_into().ok()?) as usize;
    let world = u64::from_le_bytes(hello[16..24].try_into().ok()?) as usize;
    Some((rank, world))
}
