//! `lora-studio bench train` runs a real training step end to end (tiny network on the CPU); `bench kernels`
//! needs a CUDA build.

#[test]
fn bench_train_reports_a_finite_training_step() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args([
            "bench",
            "train",
            "--family",
            "tiny",
            "--resolution",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["loss_finite"], true);
    assert_eq!(r["precision"], "f32");
    assert!(r["median_step_ms"].as_f64().unwrap() > 0.0);
    assert!(r["tflop_per_step"].as_f64().unwrap() > 0.0);
    assert_eq!(
        r["adapters"], 32,
        "q, k, v, out in both attentions of the 4 transformer blocks"
    );
    assert_eq!(r["graph"], false, "CUDA graphs need a GPU");
}

/// Without CUDA, `bench kernels` says what it needs instead of measuring nothing.
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_kernels_explains_it_needs_a_cuda_build() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args(["bench", "kernels"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}
