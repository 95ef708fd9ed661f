//! The native shim (train/native): linked, callable, and honest about what it cannot do.
use clover::native;
use tch::{Device, Kind, Tensor};

/// Without CUDA there is no device allocator: the call must fail with an error that names the
/// device, not crash or report zeros. With CUDA, allocating a tensor must raise the counters.
#[test]
fn cuda_allocator_statistics_follow_allocations_or_fail_cleanly() {
    if !tch::Cuda::is_available() {
        let err = native::cuda_allocated_bytes(0).expect_err("no CUDA, no allocator statistics");
        assert!(err.to_string().contains("cuda:0"), "{err:#}");
        return;
    }
    let before = native::cuda_allocated_bytes(0).unwrap();
    let bytes = 64 << 20;
    let t = Tensor::zeros([bytes / 4], (Kind::Float, Device::Cuda(0)));
    let during = native::cuda_allocated_bytes(0).unwrap();
    assert!(
        during.current >= before.current + bytes,
        "{before:?} -> {during:?}"
    );
    assert!(during.peak >= during.current);
    drop(t);
    native::cuda_reset_peak(0).unwrap();
    let after = native::cuda_allocated_bytes(0).unwrap();
    assert!(
        after.peak < during.peak,
        "reset peak {after:?} after {during:?}"
    );
}
