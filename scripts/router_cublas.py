#!/usr/bin/env python3
"""Times the router GEMM through cuBLAS (torch) on the GPU machine, for comparison with the crate's
own GEMM (the `<model>/T<T>/router` stage of examples/moe_layer.rs): logits [T, E] = x [T, H] . W^T,
bf16 inputs. Two cuBLAS variants: bf16 output (F.linear) and f32 output (torch.mm with out_dtype,
where this torch has it), which is what moekit computes. Median of 50 CUDA-event timings."""
import sys

import torch
import torch.nn.functional as F

MODELS = {"dsv3": (7168, 256), "qwen3": (2048, 128), "mixtral": (4096, 8)}


def median_us(fn, reps=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    tokens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "128,4096,16384").split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for model, (h, e) in MODELS.items():
        w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * 0.02
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            flops = 2.0 * t * h * e
            us = median_us(lambda: F.linear(x, w))
            print(f"{model}/T{t}/router-cublas-bf16out {us:10.2f} us {flops / us / 1e6:8.1f} TFLOP/s")
            try:
                us = median_us(lambda: torch.mm(x, w.t(), out_dtype=torch.float32))
                print(f"{model}/T{t}/router-cublas-f32out {us:10.2f} us {flops / us / 1e6:8.1f} TFLOP/s")
            except (TypeError, RuntimeError) as err:
                print(f"{model}/T{t}/router-cublas-f32out unavailable: {err}")


if __name__ == "__main__":
    main()
