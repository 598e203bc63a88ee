//! The CPU path this test process runs (`WHET_CPU`, see `whet_kernels::cpu_path`), printed so a
//! test log says which kernels it checked. `.ci/run` runs these tests once per path the machine
//! has.

fn cpu_has(path: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        match path {
            "avx512" => {
                avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw")
            }
            "avx2" => avx2,
            "scalar" => true,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        path == "scalar"
    }
}

#[test]
fn the_cpu_path_is_whet_cpu_when_the_cpu_has_it_else_the_widest() {
    let path = whet_kernels::cpu_path();
    let widest = ["avx512", "avx2", "scalar"]
        .into_iter()
        .find(|p| cpu_has(p))
        .unwrap();
    match std::env::var("WHET_CPU")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        Some(want) if cpu_has(&want) => {
            eprintln!(
                "whet-kernels CPU path: {path} (WHET_CPU={want}; this CPU's widest: {widest})"
            );
            assert_eq!(path, want);
        }
        Some(want) => {
            eprintln!(
                "WHET_CPU={want}: this CPU cannot run it (or it is no path), so the {widest} path ran instead; its own tests cover it"
            );
            assert_eq!(path, widest);
        }
        None => {
            eprintln!("whet-kernels CPU path: {path} (this CPU's widest)");
            assert_eq!(path, widest);
        }
    }
}
