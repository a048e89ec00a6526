//! Benchmark harness shared by the criterion benches and the `bench_report` example: CUDA-event
//! timing, medians, input rotation past the L2 cache, and one report line per case:
//!
//! ```text
//! case                                        median_us   TFLOP/s      GB/s  %roofline
//! ```
//!
//! Case names follow `shared/anchors/torch_anchors.py`: `<model>/T<tokens>/<stage>`, and
//! `ceiling/copy-2GiB` for the copy ceiling, so the crate's numbers pair mechanically with the
//! torch anchors measured in the same run.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use crate::error::{DuringExt, Result};

mod suite;
pub use suite::{cases, BenchCase, CaseSpec, SuiteOptions};

/// The ceilings a case's `%roofline` is taken against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    /// Device-to-device copy bandwidth, GB/s (bytes read + written per second / 1e9).
    pub copy_gbps: f64,
    /// Dense bf16 matrix rate on random data, TFLOP/s.
    pub bf16_tflops: f64,
}

impl Default for Roofline {
    /// The H200 as measured in this project: torch's 2 GiB `copy_` moved 4250 GB/s and an
    /// 8192³ bf16 GEMM ran 790 TFLOP/s on random data. `bench_report` replaces the copy figure with
    /// the probe's own measurement from the same run.
    fn default() -> Self {
        Self {
            copy_gbps: 4250.0,
            bf16_tflops: 790.0,
        }
    }
}

/// One timed case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// `<model>/T<tokens>/<stage>`.
    pub case: String,
    /// Median time of one launch (sequence), microseconds.
    pub median_us: f64,
    /// Useful floating-point operations per launch, if the case does arithmetic.
    pub flops: Option<f64>,
    /// Floor bytes per launch (each input read once, each output written once), if counted.
    pub bytes: Option<f64>,
}

impl CaseResult {
    /// TFLOP/s at the median time.
    pub fn tflops(&self) -> Option<f64> {
        self.flops.map(|f| f / self.median_us / 1e6)
    }

    /// GB/s of floor bytes at the median time.
    pub fn gbps(&self) -> Option<f64> {
        self.bytes.map(|b| b / self.median_us / 1e3)
    }

    /// Percent of the roofline: the floor time (the larger of bytes over copy bandwidth and
    /// FLOPs over the matrix rate) over the measured time.
    pub fn roofline_pct(&self, roof: &Roofline) -> Option<f64> {
        let mem_us = self.bytes.map(|b| b / (roof.copy_gbps * 1e3));
        let math_us = self.flops.map(|f| f / (roof.bf16_tflops * 1e6));
        let floor = match (mem_us, math_us) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some(100.0 * floor / self.median_us)
    }

    /// The report line: `case  median_us  TFLOP/s  GB/s  %roofline` (`-` where not applicable).
    pub fn line(&self, roof: &Roofline) -> String {
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        format!(
            "{:<44} {:>10.2} {:>9} {:>9} {:>9}",
            self.case,
            self.median_us,
            opt(self.tflops(), 1),
            opt(self.gbps(), 1),
            opt(self.roofline_pct(roof), 1)
        )
    }
}

/// The header matching [`CaseResult::line`].
pub fn header() -> String {
    format!(
        "{:<44} {:>10} {:>9} {:>9} {:>9}",
        "case", "median_us", "TFLOP/s", "GB/s", "%roofline"
    )
}

/// How many input sets to rotate through so that consecutive launches do not find their inputs in
/// L2: enough sets to cover three times the L2 size, at least one, at most 64.
pub fn rotation_sets(bytes_per_set: usize, l2_bytes: usize) -> usize {
    if bytes_per_set == 0 {
        return 1;
    }
    (3 * l2_bytes).div_ceil(bytes_per_set).clamp(1, 64)
}

/// Per-launch times from CUDA events.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Microseconds of each timed repetition, in order.
    pub samples_us: Vec<f64>,
}

impl Timing {
    /// Median of the samples.
    pub fn median_us(&self) -> f64 {
        let mut s = self.samples_us.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2])
        }
    }

    /// Smallest sample.
    pub fn min_us(&self) -> f64 {
        self.samples_us
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }
}

fn timing_event(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
    stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .during("creating a timing event")
}

/// Device time the host gets to enqueue one timed launch (events + launch) while the GPU spins:
/// larger than the slowest enqueue measured here (the routing plan, three kernels and ten buffer
/// guards, ~30 us with cudarc's event tracking).
pub const ENQUEUE_HEADROOM_US: f64 = 100.0;

/// Times `reps` calls of `launch(i)` (after `warmup` untimed calls), each between its own pair of
/// CUDA events on `stream`; `i` counts every call, so `launch` can rotate its inputs by `i`.
///
/// Before each timed call the stream spins for [`ENQUEUE_HEADROOM_US`] on the device
/// ([`crate::probe::busy_wait`]), so the events measure the device time of the launch, not the
/// host's enqueue latency. (Without it, v1 of this harness reported an empty kernel at 4.2 us and
/// a 5 us gating kernel at 21 us.)
pub fn time_launches(
    stream: &Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    for i in 0..warmup {
        launch(i)?;
    }
    let events: Vec<(CudaEvent, CudaEvent)> = (0..reps)
        .map(|_| Ok((timing_event(stream)?, timing_event(stream)?)))
        .collect::<Result<_>>()?;
    for (i, (start, end)) in events.iter().enumerate() {
        crate::probe::busy_wait(stream, ENQUEUE_HEADROOM_US)?;
        start.record(stream).during("recording an event")?;
        launch(warmup + i)?;
        end.record(stream).during("recording an event")?;
    }
    stream
        .synchronize()
        .during("waiting for the timed launches")?;
    let samples_us = events
        .iter()
        .map(|(s, e)| Ok(s.elapsed_ms(e).during("reading an event")? as f64 * 1e3))
        .collect::<Result<_>>()?;
    Ok(Timing { samples_us })
}

/// For criterion's `iter_custom`: the device time of `iters` back-to-back calls of `launch(i)`,
/// in batches of up to 64 between CUDA events, each batch behind a device spin long enough for the
/// host to enqueue it, so short kernels are not timed at the host's enqueue rate.
pub fn time_iters(
    stream: &Arc<CudaStream>,
    iters: u64,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<Duration> {
    const BATCH: u64 = 64;
    let (start, end) = (timing_event(stream)?, timing_event(stream)?);
    let mut total_ms = 0.0f64;
    let mut done = 0u64;
    while done < iters {
        let n = BATCH.min(iters - done);
        crate::probe::busy_wait(stream, ENQUEUE_HEADROOM_US * n as f64)?;
        start.record(stream).during("recording an event")?;
        for i in done..done + n {
            launch(i as usize)?;
        }
        end.record(stream).during("recording an event")?;
        end.synchronize().during("waiting for the timed launches")?;
        total_ms += start.elapsed_ms(&end).during("reading an event")? as f64;
        done += n;
    }
    Ok(Duration::from_secs_f64(total_ms * 1e-3))
}
