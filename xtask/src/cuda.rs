//! `cargo xtask cuda-build`: builds whet's CUDA test and bench binaries for a GPU machine that
//! has no Rust toolchain and no network, from a machine that may have no GPU and no CUDA.
//!
//! 1. A CUDA compiler: `nvcc` from `$PATH` or `$CUDA_HOME` if there is one; otherwise CUDA
//!    13.0 from PyPI (the pinned wheels below) installed once into
//!    `~/.cache/whet/cuda-toolchain/13.0`. 13.0 because the GPU machines' driver reports CUDA 13.0
//!    (a newer toolkit's PTX would not load there) and their CUDA libraries (nvcc 13.0, PyTorch
//!    cu130) are CUDA 13's: the binaries link `libcublas.so.13`, `libnvrtc.so.13`, ... and find
//!    them there, so the bundle carries no libraries by default (`--bundle-libs` copies them
//!    in: about 1.2 GB).
//! 2. The link-time pieces a wheel install lacks: unversioned `lib*.so` links, and a stub
//!    `libcuda.so` (the driver API names of cudarc, each returning CUDA_ERROR_STUB_LIBRARY),
//!    which only the linker sees; at run time the driver's real `libcuda.so.1` is used.
//! 3. `cargo test --no-run --release` and `cargo bench --no-run` with the `cuda` features for
//!    sm_90 (`CUDA_COMPUTE_CAP=90`, which candle-kernels' nvcc build reads), plus the `whet`
//!    CLI; the executables are collected from cargo's JSON messages.
//! 4. A bundle folder: `bin/` (the executables), `run.sh` (finds the CUDA libraries, runs every
//!    test binary, then the benches), and the one command to run it there.
//!
//! `cargo xtask cuda-env` prints the environment (`eval "$(cargo xtask cuda-env)"`) so that
//! `cargo clippy --features whet/cuda` and friends work by hand.
//!
//! `cargo xtask cuda-check` is CI's CUDA step, on a machine with no GPU and no CUDA toolkit:
//! the same PyPI toolkit, then clippy over the workspace with the `cuda` features (and `cuda`
//! with `mpi`), then the CUDA test module of whet-kernels, where `nvrtc_compiles_every_kernel`
//! compiles every `.cu` kernel with NVRTC for sm_80 and sm_90 and the tests that need a GPU
//! print why they skipped. Its build folder is `~/.cache/whet/cuda-check-target` (or
//! `$WHET_CACHE/...`), kept between runs, because candle-kernels' nvcc build dominates it.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// CUDA 13.0 from PyPI: compiler, headers, runtime, NVRTC, cuBLAS, cuRAND, CCCL (all land in
/// `site/nvidia/cu13`, which is laid out like a toolkit: bin, include, lib, nvvm).
const CUDA_VERSION: &str = "13.0";
const CUDA_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
    "nvidia-cuda-cccl==13.0.85",
    // whet-train's `cuda` feature all-reduces through NCCL (cudarc's bindings are NCCL 2.30's).
    "nvidia-nccl-cu13==2.30.7",
];
/// Shared libraries the CUDA binaries load (besides the driver's `libcuda.so.1`), by the
/// unversioned name the linker asks for and the versioned file the wheels ship (relative to
/// `lib/`; NCCL has a wheel of its own).
const CUDA_LIBS: &[(&str, &str)] = &[
    ("libcudart.so", "libcudart.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libcurand.so", "libcurand.so.10"),
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libnccl.so", "../../nccl/lib/libnccl.so.2"),
];
/// Also needed at run time, loaded by NVRTC itself.
const NVRTC_BUILTINS: &str = "libnvrtc-builtins.so.13.0";
/// H100 / H200.
const COMPUTE_CAP: &str = "90";
/// The packages whose test binaries and benches go into the bundle.
const TEST_FEATURES: &str = "whet-kernels/cuda,whet-optim/cuda,whet-model/cuda";

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Where the PyPI toolkit is installed: outside the clone (`~/.cache/whet/cuda-toolchain`), so
/// that CI's fresh clones and `cargo clean` keep it.
fn toolchain_dir() -> PathBuf {
    crate::cache_dir().join("cuda-toolchain")
}

/// A CUDA toolkit root: `bin/nvcc`, `include/`, `lib/`.
struct Toolkit {
    root: PathBuf,
    /// Installed here from PyPI (so we made its link-time pieces), not the system's.
    from_pypi: bool,
    /// More variables for cargo (`--flash-attn`'s CUTLASS).
    extra_env: Vec<(String, String)>,
}

impl Toolkit {
    fn env(&self) -> Vec<(String, String)> {
        let r = self.root.display().to_string();
        let path = format!(
            "{r}/bin:{}",
            env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let mut v = vec![
            ("PATH".into(), path),
            ("CUDA_HOME".into(), r.clone()),
            ("CUDA_ROOT".into(), r.clone()),
            ("CUDA_PATH".into(), r.clone()),
            ("CUDA_COMPUTE_CAP".into(), COMPUTE_CAP.into()),
        ];
        if self.from_pypi {
            let lib = format!("{r}/lib:{r}/lib/stubs");
            v.push(("LIBRARY_PATH".into(), lib));
        }
        v.extend(self.extra_env.iter().cloned());
        v
    }
}

/// nvcc on PATH or under CUDA_HOME, else the PyPI toolkit (installed on first use).
fn toolkit(allow_system: bool) -> Result<Toolkit> {
    if allow_system {
        let from_home = env::var_os("CUDA_HOME")
            .map(PathBuf::from)
            .filter(|h| h.join("bin/nvcc").exists());
        let from_path = env::var_os("PATH").and_then(|p| {
            env::split_paths(&p)
                .find(|d| d.join("nvcc").exists())
                .and_then(|d| d.parent().map(Path::to_path_buf))
        });
        if let Some(root) = from_home.or(from_path) {
            // Our own PyPI install, on PATH after `eval "$(cargo xtask cuda-env)"`.
            let from_pypi = root.starts_with(toolchain_dir());
            if !from_pypi {
                eprintln!("cuda: using the system toolkit at {}", root.display());
            }
            return Ok(Toolkit {
                root,
                from_pypi,
                extra_env: Vec::new(),
            });
        }
    }
    let dir = toolchain_dir().join(CUDA_VERSION);
    let root = dir.join("site/nvidia/cu13");
    let stamp = dir.join("installed.txt");
    let wanted = CUDA_WHEELS.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        eprintln!(
            "cuda: no nvcc found; installing CUDA {CUDA_VERSION} from PyPI into {} (about 1.2 GB) ...",
            dir.display()
        );
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        run(Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(dir.join("site"))
            .args(CUDA_WHEELS))
        .context("pip install of the CUDA wheels failed: needs python3 with pip and PyPI")?;
        link_time_pieces(&root)?;
        fs::write(&stamp, &wanted)?;
    }
    Ok(Toolkit {
        root,
        from_pypi: true,
        extra_env: Vec::new(),
    })
}

/// The CUTLASS commit candle-flash-attn 0.11.1's build pins (its `CUTLASS_COMMIT`: v3.5.0), and
/// the PyPI package that ships the same headers.
const CUTLASS_COMMIT: &str = "7d49e6c7e2f8896c47f586706e67e1fb215529dc";
const CUTLASS_WHEEL: &str = "nvidia-cutlass==3.5.0.0";

/// The environment for building candle-flash-attn without a network: its build (cudaforge)
/// clones CUTLASS into `$CUDAFORGE_HOME/git/checkouts/cutlass-<commit[..16]>` unless that
/// folder has an `include/` and `git rev-parse HEAD` there prints the pinned commit. So the
/// headers come from the PyPI package, laid out as the checkout would be, in a git folder
/// whose HEAD names the commit. The compiled objects go to `<target>/flash-attn-build`
/// (`CANDLE_FLASH_ATTN_BUILD_DIR`), which cudaforge rebuilds incrementally.
fn flash_attn_env(build: &Path) -> Result<Vec<(String, String)>> {
    let home = crate::cache_dir().join("cudaforge");
    let checkout = home
        .join("git/checkouts")
        .join(format!("cutlass-{}", &CUTLASS_COMMIT[..16]));
    if !checkout.join("include/cutlass/cutlass.h").exists() {
        let site = crate::cache_dir().join("cutlass-3.5.0");
        if !site.join("cutlass_library/source/include").exists() {
            eprintln!("flash-attn: installing {CUTLASS_WHEEL} (CUTLASS headers) from PyPI ...");
            run(Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
                .arg(&site)
                .arg(CUTLASS_WHEEL))
            .context("pip install of nvidia-cutlass failed")?;
        }
        let src = site.join("cutlass_library/source");
        let _ = fs::remove_dir_all(&checkout);
        fs::create_dir_all(checkout.join("tools/util"))?;
        std::os::unix::fs::symlink(src.join("include"), checkout.join("include"))?;
        std::os::unix::fs::symlink(
            src.join("tools/util/include"),
            checkout.join("tools/util/include"),
        )?;
        run(Command::new("git")
            .args(["init", "--quiet"])
            .current_dir(&checkout))?;
        fs::write(checkout.join(".git/HEAD"), format!("{CUTLASS_COMMIT}\n"))?;
        eprintln!(
            "flash-attn: CUTLASS {CUTLASS_COMMIT} headers from {CUTLASS_WHEEL} at {}",
            checkout.display()
        );
    }
    fs::create_dir_all(build)?;
    Ok(vec![
        ("CUDAFORGE_HOME".into(), home.display().to_string()),
        (
            "CANDLE_FLASH_ATTN_BUILD_DIR".into(),
            build.display().to_string(),
        ),
    ])
}

/// Unversioned library links and the stub `libcuda.so` that a wheel install lacks.
fn link_time_pieces(root: &Path) -> Result<()> {
    let lib = root.join("lib");
    for (link, file) in CUDA_LIBS {
        let dst = lib.join(link);
        if !lib.join(file).exists() {
            bail!(
                "the CUDA wheels did not provide {}",
                lib.join(file).display()
            );
        }
        let _ = fs::remove_file(&dst);
        std::os::unix::fs::symlink(file, &dst)?;
    }
    let stubs = lib.join("stubs");
    fs::create_dir_all(&stubs)?;
    let names = driver_api_names()?;
    let mut c = String::from(
        "/* Link-time stand-in for the CUDA driver (generated by `cargo xtask cuda-build`):\n   every entry point returns CUDA_ERROR_STUB_LIBRARY (34). */\n",
    );
    for n in &names {
        c.push_str(&format!("int {n}(void) {{ return 34; }}\n"));
    }
    let src = stubs.join("libcuda_stub.c");
    fs::write(&src, c)?;
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O0", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(stubs.join("libcuda.so"))
        .arg(&src))
    .context("compiling the stub libcuda.so (needs a C compiler, `cc`)")?;
    // Only for running CUDA binaries where there is no driver (`cuda-check`): every CUDA call
    // then fails with CUDA_ERROR_STUB_LIBRARY and the GPU tests skip; NVRTC still works.
    let _ = fs::remove_file(stubs.join("libcuda.so.1"));
    std::os::unix::fs::symlink("libcuda.so", stubs.join("libcuda.so.1"))?;
    eprintln!("cuda: stub libcuda.so with {} entry points", names.len());
    Ok(())
}

/// The driver API functions cudarc declares (`pub unsafe fn cu...` in its driver bindings),
/// read from the cudarc source that Cargo.lock pins.
fn driver_api_names() -> Result<Vec<String>> {
    let lock = fs::read_to_string(root().join("Cargo.lock"))?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"cudarc\""))
        .and_then(|p| p.split("version = \"").nth(1))
        .and_then(|v| v.split('"').next())
        .context("Cargo.lock has no cudarc package (is the `cuda` feature wired?)")?;
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let registry = cargo_home.join("registry/src");
    let find = || -> Option<PathBuf> {
        fs::read_dir(&registry)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| {
                e.path()
                    .join(format!("cudarc-{version}/src/driver/sys/mod.rs"))
            })
            .find(|p| p.exists())
    };
    // A CPU build never unpacks cudarc (an optional dependency): on a fresh machine `cargo
    // fetch` downloads and unpacks every package of Cargo.lock.
    let src = match find() {
        Some(src) => src,
        None => {
            let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["fetch", "--quiet", "--manifest-path"])
                .arg(root().join("Cargo.toml"))
                .status()
                .context("running cargo fetch")?;
            if !status.success() {
                bail!("cargo fetch failed ({status}) while looking for cudarc {version}'s source");
            }
            find().with_context(|| {
                format!(
                    "cudarc {version} source not found under {} after `cargo fetch`",
                    registry.display()
                )
            })?
        }
    };
    let text = fs::read_to_string(&src)?;
    let mut names: Vec<String> = text
        .split("pub unsafe fn ")
        .skip(1)
        .filter_map(|s| s.split('(').next())
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// `cargo xtask cuda-check` (see the module docs): what CI runs to keep the CUDA code compiling.
pub fn check() -> Result<()> {
    let started = Instant::now();
    let tk = toolkit(true)?;
    let t_toolkit = started.elapsed();
    let target = env::var_os("WHET_CUDA_CHECK_TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join("cuda-check-target"));
    let cargo = |args: &[&str], ld_path: Option<String>| -> Result<Duration> {
        let t = Instant::now();
        let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(root())
            .args(args)
            .env("CARGO_TARGET_DIR", &target);
        for (k, v) in tk.env() {
            cmd.env(k, v);
        }
        if let Some(p) = ld_path {
            cmd.env("LD_LIBRARY_PATH", p);
        }
        eprintln!("cuda-check: cargo {}", args.join(" "));
        run(&mut cmd)?;
        Ok(t.elapsed())
    };
    let lint = ["--", "-D", "warnings"];
    let t_clippy = cargo(
        &[
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--features",
                "whet/cuda,whet-benches/cuda",
            ][..],
            &lint,
        ]
        .concat(),
        None,
    )?;
    let t_mpi = cargo(
        &[
            &[
                "clippy",
                "-p",
                "whet",
                "-p",
                "whet-train",
                "--all-targets",
                "--locked",
                "--features",
                "whet/cuda,whet/mpi,whet-train/mpi",
            ][..],
            &lint,
        ]
        .concat(),
        None,
    )?;
    let lib = tk.root.join("lib");
    let ld = format!("{}:{}", lib.display(), lib.join("stubs").display());
    let t_test = cargo(
        &[
            "test",
            "--locked",
            "-p",
            "whet-kernels",
            "--features",
            "cuda",
            "--test",
            "it",
            "cuda::",
            "--",
            "--nocapture",
        ],
        Some(ld),
    )?;
    // The `flash-attn` glue, type-checked only: candle-flash-attn's kernels take an hour of
    // nvcc, so its build (and candle-kernels') runs against a stand-in nvcc that writes empty
    // outputs, in a build folder of its own. Nothing of it is linked or run.
    let t = Instant::now();
    let stub = stub_nvcc()?;
    let stub_target = target.with_extension("flash-stub");
    let flash_env = flash_attn_env(&stub_target.join("flash-attn-build"))?;
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args([
            "clippy",
            "-p",
            "whet-kernels",
            "--all-targets",
            "--locked",
            "--features",
            "flash-attn",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", &stub_target)
        .env("NVCC", &stub)
        .env("CUDA_COMPUTE_CAP", COMPUTE_CAP);
    // `NVCC` is what cudaforge (candle-kernels, candle-flash-attn) runs; the real nvcc stays on
    // PATH for cudarc's build, which reads the CUDA version from `nvcc --version`.
    for (k, v) in tk.env().into_iter().chain(flash_env) {
        cmd.env(k, v);
    }
    eprintln!("cuda-check: cargo clippy -p whet-kernels --features flash-attn (stub nvcc)");
    run(&mut cmd)?;
    let t_flash = t.elapsed();
    println!(
        "cuda-check: toolkit {:.0} s, clippy (cuda) {:.0} s, clippy (cuda + mpi) {:.0} s, CUDA tests {:.0} s, flash-attn type-check {:.0} s; build folder {}",
        t_toolkit.as_secs_f64(),
        t_clippy.as_secs_f64(),
        t_mpi.as_secs_f64(),
        t_test.as_secs_f64(),
        t_flash.as_secs_f64(),
        target.display()
    );
    Ok(())
}

/// A stand-in `nvcc` for type-checking builds whose build scripts compile CUDA: it answers
/// `--version`, writes an empty `.ptx` per source for `--ptx`, an empty archive for `--lib`
/// and an empty object for `-c -o`. Whatever it "builds" must never be linked.
fn stub_nvcc() -> Result<PathBuf> {
    let path = crate::cache_dir().join("stub-nvcc/nvcc");
    fs::create_dir_all(path.parent().context("a parent")?)?;
    let script = r#"#!/bin/sh
# Stand-in nvcc for type-checking only (written by `cargo xtask cuda-check`): empty outputs.
out=""; dir="."; ptx=0; lib=0; prev=""; srcs=""
for a in "$@"; do
  case "$a" in
    --version) echo "Cuda compilation tools, release 13.0, V13.0.88 (stub)"; exit 0 ;;
    --ptx) ptx=1 ;;
    --lib) lib=1 ;;
    *.cu) srcs="$srcs $a" ;;
  esac
  [ "$prev" = "-o" ] && out="$a"
  [ "$prev" = "--output-directory" ] && dir="$a"
  prev="$a"
done
if [ $ptx = 1 ]; then
  for s in $srcs; do b=$(basename "$s" .cu); : > "$dir/$b.ptx"; done
elif [ $lib = 1 ]; then
  rm -f "$out"; ar rcs "$out"
elif [ -n "$out" ]; then
  : > "$out"
fi
"#;
    fs::write(&path, script)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// `cargo xtask cuda-env`: the environment for building with the `cuda` features by hand.
pub fn print_env() -> Result<()> {
    let tk = toolkit(true)?;
    for (k, v) in tk.env() {
        println!("export {k}='{v}'");
    }
    Ok(())
}

/// An executable cargo reported: `<package>-<target>` (e.g. `whet-kernels-it`) and its path.
struct Artifact {
    name: String,
    path: PathBuf,
}

/// Runs cargo with `args` under the toolkit's environment and returns the executables of the
/// artifacts it reports (`--message-format=json`) whose target kind is `kind` (`test`,
/// `bench`, `bin`): integration tests only, not the libraries' unit-test binaries.
fn cargo_executables(tk: &Toolkit, args: &[&str], kind: &str) -> Result<Vec<Artifact>> {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args(args)
        .arg("--message-format=json-render-diagnostics");
    for (k, v) in tk.env() {
        cmd.env(k, v);
    }
    eprintln!("cuda: cargo {}", args.join(" "));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    // A JSON string field of a one-line message, without a JSON dependency in xtask.
    let field = |line: &str, key: &str| -> Option<String> {
        line.split(&format!("\"{key}\":\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(str::to_string)
    };
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"")
            || !line.contains(&format!("\"kind\":[\"{kind}\"]"))
        {
            continue;
        }
        let (Some(exe), Some(pkg), Some(target)) = (
            field(line, "executable"),
            field(line, "package_id"),
            line.split("\"target\":{")
                .nth(1)
                .and_then(|t| field(t, "name")),
        ) else {
            continue;
        };
        // `path+file:///.../crates/whet-kernels#0.0.0` -> `whet-kernels`,
        // `path+file:///.../benches#whet-benches@0.0.0` -> `whet-benches`
        let (path, frag) = pkg.split_once('#').unwrap_or((&pkg, ""));
        let pkg = match frag.split_once('@') {
            Some((name, _)) => name,
            None => path.rsplit('/').next().unwrap_or("whet"),
        }
        .to_string();
        let name = if kind == "bin" {
            target
        } else {
            format!("{pkg}-{target}")
        };
        exes.push(Artifact {
            name,
            path: PathBuf::from(exe),
        });
    }
    Ok(exes)
}

/// `cargo xtask cuda-build [--out DIR] [--bundle-libs] [--archive] [--pypi] [--flash-attn]`;
/// `--flash-attn` adds candle-flash-attn (an hour or more of nvcc on 2 cores, the first time).
pub fn build(args: &[String]) -> Result<()> {
    let flag = |f: &str| args.iter().any(|a| a == f);
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("cuda-bundle"));
    let out = if out.is_absolute() {
        out
    } else {
        env::current_dir()?.join(out)
    };
    let started = Instant::now();
    let mut tk = toolkit(!flag("--pypi"))?;
    let flash = flag("--flash-attn");
    if flash {
        tk.extra_env
            .extend(flash_attn_env(&target_dir().join("flash-attn-build"))?);
    }
    let t_toolkit = started.elapsed();
    let (test_features, cli_features) = if flash {
        (
            format!("{TEST_FEATURES},whet-kernels/flash-attn"),
            "whet/cuda,whet/flash-attn",
        )
    } else {
        (TEST_FEATURES.to_string(), "whet/cuda")
    };

    let tests = cargo_executables(
        &tk,
        &[
            "test",
            "--no-run",
            "--release",
            "--locked",
            "-p",
            "whet-kernels",
            "-p",
            "whet-optim",
            "-p",
            "whet-model",
            "--features",
            &test_features,
        ],
        "test",
    )?;
    let benches = cargo_executables(
        &tk,
        &[
            "bench",
            "--no-run",
            "--locked",
            "-p",
            "whet-benches",
            "--features",
            "whet-benches/cuda",
            "--bench",
            "cuda_kernels",
            "--bench",
            "cuda_step",
        ],
        "bench",
    )?;
    let cli = cargo_executables(
        &tk,
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "whet",
            "--features",
            cli_features,
        ],
        "bin",
    )?;
    let t_build = started.elapsed() - t_toolkit;

    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(out.join("bin"))?;
    for a in tests.iter().chain(&benches).chain(&cli) {
        let dst = out.join("bin").join(&a.name);
        fs::copy(&a.path, &dst).with_context(|| format!("copying {}", a.path.display()))?;
        // Line tables stay out of the bundle (symbols stay, for backtraces): it must fit
        // through small transfers.
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(&dst)
            .status();
    }
    if flag("--bundle-libs") {
        let lib = out.join("lib");
        fs::create_dir_all(&lib)?;
        let src = tk.root.join("lib");
        for (_, file) in CUDA_LIBS {
            let name = Path::new(file).file_name().expect("a file name");
            fs::copy(src.join(file), lib.join(name))?;
        }
        fs::copy(src.join(NVRTC_BUILTINS), lib.join(NVRTC_BUILTINS))?;
    }
    // The PyTorch + PEFT side of the training-step bench, run by `run.sh benches` after whet's.
    fs::copy(
        root().join("benches/train_step_gpu.py"),
        out.join("train_step_gpu.py"),
    )?;
    let names = |v: &[Artifact]| v.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
    fs::write(
        out.join("run.sh"),
        run_script(&names(&tests), &names(&benches)),
    )?;
    let size: u64 = fs::read_dir(out.join("bin"))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "cuda-build: toolkit {:.0} s, cargo {:.0} s; {} test and {} bench binaries + whet, {:.0} MiB, in {}",
        t_toolkit.as_secs_f64(),
        t_build.as_secs_f64(),
        tests.len(),
        benches.len(),
        size as f64 / (1 << 20) as f64,
        out.display()
    );
    println!("on the GPU machine (CUDA 13 driver and libraries, no Rust needed), run:");
    println!("  bash {}/run.sh", out.display());
    if flag("--archive") {
        // One xz archive beside the folder, for transfers with a size limit.
        let parent = out.parent().context("the bundle folder has a parent")?;
        let name = out
            .file_name()
            .context("the bundle folder has a name")?
            .to_string_lossy()
            .to_string();
        let archive = parent.join(format!("{name}.tar.xz"));
        run(Command::new("tar")
            .env("XZ_OPT", "-6 -T0")
            .arg("-cJf")
            .arg(&archive)
            .arg("-C")
            .arg(parent)
            .arg(&name))?;
        let mib = fs::metadata(&archive)?.len() as f64 / (1 << 20) as f64;
        println!(
            "archive: {} ({mib:.0} MiB); there: tar -xJf {name}.tar.xz -C /tmp && bash /tmp/{name}/run.sh",
            archive.display()
        );
    }
    println!("(`run.sh tests` or `run.sh benches` runs one half)");
    Ok(())
}

/// The bundle's `run.sh`: finds the CUDA 13 libraries (`$WHET_CUDA_LIBS`, the bundle's `lib/`,
/// PyTorch's `nvidia/cu13/lib` and `nvidia/nccl/lib`, `/usr/local/cuda`), checks that every
/// binary resolves them, then runs the CUDA tests (`cuda::*`, with their output) and the benches.
fn run_script(tests: &[String], benches: &[String]) -> String {
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask cuda-build`: runs whet's CUDA tests, then its CUDA benches.
# Usage: bash run.sh [tests|benches|all] (default all). Needs an NVIDIA driver for CUDA >= 13.0.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
what="${{1:-all}}"
dirs=()
[ -n "${{WHET_CUDA_LIBS:-}}" ] && dirs+=("$WHET_CUDA_LIBS")
[ -d "$here/lib" ] && dirs+=("$here/lib")
for py in python3 /opt/torch/.venv/bin/python3; do
  for sub in cu13/lib nccl/lib; do
    d="$($py -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], '$sub'))" 2>/dev/null)" && [ -d "$d" ] && dirs+=("$d")
  done
done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13.0/lib64; do
  [ -d "$d" ] && dirs+=("$d")
done
[ -n "${{LD_LIBRARY_PATH:-}}" ] && dirs+=("$LD_LIBRARY_PATH")
LD_LIBRARY_PATH="$(IFS=:; echo "${{dirs[*]}}")"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing="$(ldd "$here"/bin/* 2>/dev/null | grep 'not found' | sort -u)"
if [ -n "$missing" ]; then
  echo "missing CUDA libraries (set WHET_CUDA_LIBS to a folder holding them):"; echo "$missing"; exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  for t in {tests}; do
    echo "== $t"
    # The CUDA tests only (the CPU ones are CI's); each prints the error it reached.
    "$here/bin/$t" cuda --test-threads=1 --nocapture || status=1
  done
fi
if [ "$what" = all ] || [ "$what" = benches ]; then
  for b in {benches}; do
    echo "== $b"
    "$here/bin/$b" --bench --warm-up-time 1 --measurement-time 3 --sample-size 10 || status=1
  done
  echo "== PyTorch + PEFT, the same training step (benches/train_step_gpu.py)"
  python3 "$here/train_step_gpu.py" || echo "PyTorch side failed or is missing (needs torch, transformers, peft)"
fi
exit $status
"#,
        tests = tests.join(" "),
        benches = benches.join(" "),
    )
}
