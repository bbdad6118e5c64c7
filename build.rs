//! With `--features cuda`, compiles `kernels/*.cu` to PTX (loaded by the driver at run time, like candle's own
//! kernels). `CUDA_COMPUTE_CAP` picks the target as for candle (e.g. 86 for RTX 30xx); `nvcc` comes from `PATH`
//! or `CUDA_HOME`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    // Flash attention's tensor-core instructions need sm_80 (Ampere); src/model/fused.rs checks this.
    println!("cargo::rustc-env=LORA_STUDIO_CUDA_CAP={cap}");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for name in ["train", "attention"] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("kernels/{name}.cu"))
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| {
                panic!("could not run {nvcc:?} (install the CUDA toolkit or set CUDA_HOME): {e}")
            });
        assert!(status.success(), "nvcc failed to compile kernels/{name}.cu");
    }
}
