//! Build script: compiles `kernels/**/*.cu` with nvcc into one static library of `extern "C"`
//! launchers, links the CUDA runtime statically, and generates the Rust FFI for
//! `kernels/include/moekit.h` with bindgen.
//!
//! Each `.cu` file is one nvcc invocation with whole-program device compilation (no relocatable
//! device code), so no device-link step is needed; `cc` only archives the objects and prints the
//! link lines. Objects are cached by a hash of the flags, the `.cu` file and every header under
//! `kernels/`, in a folder shared by all profiles, so `cargo test`, `clippy` and `doc` compile the
//! kernels once.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where `scripts/install-cuda.sh` puts the pip-wheel toolkit, relative to the crate root.
const LOCAL_NVCC: &str = ".toolkit/cuda/nvidia/cu13/bin/nvcc";
const LOCAL_LIBCLANG: &str = ".toolkit/libclang/clang/native";
const DEFAULT_ARCH: &str = "90a";
const ENV_READ: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "MOEKIT_CUDA_ARCH",
    "MOEKIT_NVCC_FLAGS",
    "MOEKIT_LINEINFO",
    "NVCC_CCBIN",
    "LIBCLANG_PATH",
    "DOCS_RS",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_READ {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(moekit_kernels_built)");

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());

    generate_bindings(&root, &out_dir);

    if env::var_os("DOCS_RS").is_some() {
        // docs.rs has no nvcc: document the API without kernels. `Context::new` then returns
        // `Error::KernelsNotBuilt`.
        println!("cargo:warning=moekit: DOCS_RS is set, CUDA kernels are not compiled");
        return;
    }

    let nvcc = find_nvcc(&root).unwrap_or_else(|searched| {
        panic!(
            "\n\nmoekit: nvcc (the CUDA compiler) was not found. Looked in: {searched}.\n\
             Install the CUDA 13.0 toolkit and set CUDA_HOME, or run\n\n    ./scripts/install-cuda.sh\n\n\
             which installs nvcc 13.0 from NVIDIA's pip wheels into .toolkit/ (the README's\n\
             commands ./scripts/test.sh and ./scripts/demo.sh run it for you).\n\n"
        )
    });
    let objects = compile_kernels(&root, &out_dir, &nvcc);
    cc::Build::new()
        .objects(&objects)
        .cargo_warnings(false)
        .compile("moekit_kernels");
    link_cuda_runtime(&nvcc);
    println!("cargo:rustc-cfg=moekit_kernels_built");
}

/// nvcc in the documented search order; `Err` lists what was searched.
fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(("$NVCC".into(), PathBuf::from(p)));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push((format!("${var}/bin"), PathBuf::from(p).join("bin/nvcc")));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            candidates.push(("PATH".into(), dir.join("nvcc")));
        }
    }
    candidates.push((
        "/usr/local/cuda/bin".into(),
        "/usr/local/cuda/bin/nvcc".into(),
    ));
    candidates.push((LOCAL_NVCC.into(), root.join(LOCAL_NVCC)));
    for (_, path) in &candidates {
        if path.is_file() {
            return Ok(path.clone());
        }
    }
    let mut names: Vec<String> = candidates.into_iter().map(|(n, _)| n).collect();
    names.dedup();
    Err(names.join(", "))
}

fn gencode_flags() -> Vec<String> {
    let arch = env::var("MOEKIT_CUDA_ARCH").unwrap_or_else(|_| DEFAULT_ARCH.to_string());
    arch.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}"))
        .collect()
}

fn nvcc_flags(root: &Path) -> Vec<String> {
    let mut flags = gencode_flags();
    flags.extend(
        [
            "-O3",
            "-std=c++17",
            "-DNDEBUG",
            "--expt-relaxed-constexpr",
            "-Xptxas",
            "-v",
            "-Xcompiler",
            "-fPIC",
            "-Xcudafe",
            "--display_error_number",
        ]
        .map(String::from),
    );
    // Line info lets ncu map stalls to source lines but triples the size of the fatbins (measured:
    // the gating kernels' object grows from 0.7 MB to 4.4 MB per dtype). On by default;
    // MOEKIT_LINEINFO=0 leaves it out, e.g. for the GPU bundle, which must stay under 64 MB.
    if env::var("MOEKIT_LINEINFO").map_or(true, |v| v != "0") {
        flags.push("-lineinfo".into());
    }
    flags.push(format!("-I{}", root.join("kernels/include").display()));
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        flags.push(format!("-ccbin={ccbin}"));
    }
    if let Ok(extra) = env::var("MOEKIT_NVCC_FLAGS") {
        flags.extend(extra.split_whitespace().map(String::from));
    }
    flags
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("moekit: cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A shared object cache under the target directory, so every profile reuses the same objects.
fn cache_dir(out_dir: &Path) -> PathBuf {
    // OUT_DIR = <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"));
    match build.and_then(|b| b.parent()).and_then(|p| p.parent()) {
        Some(target) => target.join("moekit-kernel-cache"),
        None => out_dir.join("kernel-cache"),
    }
}

fn compile_kernels(root: &Path, out_dir: &Path, nvcc: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    collect_files(&root.join("kernels"), &mut files);
    let sources: Vec<PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .cloned()
        .collect();
    let flags = nvcc_flags(root);

    // Every header can be included by every .cu file: hash them all into each key.
    let mut header_hash = DefaultHasher::new();
    for f in files
        .iter()
        .filter(|p| p.extension().is_none_or(|e| e != "cu"))
    {
        f.strip_prefix(root).unwrap().hash(&mut header_hash);
        fs::read(f).unwrap().hash(&mut header_hash);
    }
    nvcc.hash(&mut header_hash);
    flags.hash(&mut header_hash);
    let common = header_hash.finish();

    let cache = cache_dir(out_dir);
    let reports = out_dir.join("ptxas");
    fs::create_dir_all(&cache).unwrap();
    fs::create_dir_all(&reports).unwrap();

    let queue = Mutex::new(sources.clone());
    let results = Mutex::new(Vec::new());
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(sources.len().max(1)) {
            s.spawn(|| loop {
                let Some(src) = queue.lock().unwrap().pop() else {
                    break;
                };
                let r = compile_one(root, &src, nvcc, &flags, common, &cache, &reports);
                results.lock().unwrap().push(r);
            });
        }
    });
    let mut objects = Vec::new();
    let mut failures = Vec::new();
    for r in results.into_inner().unwrap() {
        match r {
            Ok(o) => objects.push(o),
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        panic!("\n\nmoekit: nvcc failed:\n{}\n", failures.join("\n\n"));
    }
    objects.sort();
    objects
}

fn compile_one(
    root: &Path,
    src: &Path,
    nvcc: &Path,
    flags: &[String],
    common: u64,
    cache: &Path,
    reports: &Path,
) -> Result<PathBuf, String> {
    let rel = src.strip_prefix(root.join("kernels")).unwrap();
    let stem = rel
        .to_string_lossy()
        .replace(['/', '\\'], "_")
        .replace(".cu", "");
    let mut h = DefaultHasher::new();
    common.hash(&mut h);
    fs::read(src).unwrap().hash(&mut h);
    let key = format!("{stem}-{:016x}", h.finish());
    let obj = cache.join(format!("{key}.o"));
    let cached_report = cache.join(format!("{key}.ptxas.txt"));
    let report_path = reports.join(format!("{stem}.txt"));

    if !(obj.is_file() && cached_report.is_file()) {
        let tmp = cache.join(format!("{key}.{}.tmp.o", std::process::id()));
        let output = Command::new(nvcc)
            .args(flags)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| format!("{}: cannot run {}: {e}", rel.display(), nvcc.display()))?;
        let log = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(format!("{}:\n{log}", rel.display()));
        }
        fs::write(&cached_report, &log).unwrap();
        fs::rename(&tmp, &obj).unwrap();
    }
    let log = fs::read_to_string(&cached_report).unwrap();
    fs::write(&report_path, &log).unwrap();
    report_spills(&rel.display().to_string(), &log);
    Ok(obj)
}

/// Turns each function with spill stores/loads in the ptxas report into a cargo warning.
fn report_spills(file: &str, log: &str) {
    let mut function = "";
    for line in log.lines() {
        if let Some(i) = line.find("Function properties for ") {
            function = line[i + "Function properties for ".len()..].trim();
        }
        if line.contains("bytes spill stores") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|t| t.parse().ok())
                .collect();
            // "<stack> bytes stack frame, <st> bytes spill stores, <ld> bytes spill loads"
            if nums.len() >= 3 && (nums[1] > 0 || nums[2] > 0) {
                println!(
                    "cargo:warning=moekit: {file}: {function} spills registers ({})",
                    line.trim()
                );
            }
        }
        if line.contains("warning") && !line.contains("Function properties") {
            println!("cargo:warning=moekit: {file}: {}", line.trim());
        }
    }
}

fn link_cuda_runtime(nvcc: &Path) {
    let bin = nvcc.parent().unwrap();
    let prefix = bin.parent().unwrap();
    let mut found = false;
    for lib in [
        "lib64",
        "lib",
        "targets/x86_64-linux/lib",
        "targets/sbsa-linux/lib",
    ] {
        let dir = prefix.join(lib);
        if dir.join("libcudart_static.a").is_file() {
            println!("cargo:rustc-link-search=native={}", dir.display());
            found = true;
        }
    }
    if !found {
        panic!(
            "moekit: libcudart_static.a not found next to {} (looked in lib64, lib, targets/*/lib). \
             With the pip wheels it comes from nvidia-cuda-runtime; ./scripts/install-cuda.sh installs it.",
            nvcc.display()
        );
    }
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["dl", "rt", "pthread", "stdc++"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}

fn generate_bindings(root: &Path, out_dir: &Path) {
    if env::var_os("LIBCLANG_PATH").is_none() {
        let local = root.join(LOCAL_LIBCLANG);
        if local.join("libclang.so").is_file() {
            env::set_var("LIBCLANG_PATH", &local);
        }
    }
    let header = root.join("kernels/include/moekit.h");
    let result = std::panic::catch_unwind(|| {
        bindgen::Builder::default()
            .header(header.to_string_lossy())
            .clang_arg(format!("-I{}", root.join("kernels/include").display()))
            .clang_arg("-std=c11")
            .allowlist_function("moekit_.*")
            .allowlist_type("moekit_.*")
            .allowlist_var("MOEKIT_.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .generate_comments(true)
            .generate()
    });
    let bindings = match result {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => panic!("moekit: bindgen failed on {}: {e}", header.display()),
        Err(_) => panic!(
            "\n\nmoekit: bindgen could not load libclang. Install it (Debian: apt-get install libclang-dev),\n\
             or run ./scripts/install-cuda.sh, which installs the `libclang` pip wheel into .toolkit/,\n\
             or point LIBCLANG_PATH at the folder holding libclang.so.\n\n"
        ),
    };
    bindings
        .write_to_file(out_dir.join("moekit_ffi.rs"))
        .expect("moekit: cannot write bindings");
}
