//! Runs the MoE block of one layer of a Hugging Face checkpoint on hidden states from a file.
//!
//!     cargo run --release --example run_layer -- --checkpoint DIR --layer N \
//!         --input IN.safetensors --output OUT.safetensors [--cpu]
//!
//! Reads tensor `hidden_states` `[T, H]` (bf16 or f32) from IN, runs the block on the GPU (or the
//! CPU reference with `--cpu`) and writes `hidden_states` `[T, H]` in the input's dtype to OUT.
//! Model types: deepseek_v3, deepseek_v2, qwen3_moe, mixtral (see `moekit::moe::checkpoint`).

use std::path::PathBuf;

use clap::Parser;
use moekit::moe::checkpoint::{read_hidden_states, write_hidden_states, Checkpoint};
use moekit::moe::MoeLayer;
use moekit::Context;

#[derive(Parser, Debug)]
#[command(about = "Run one MoE layer of a Hugging Face checkpoint")]
struct Args {
    /// Checkpoint directory (config.json + *.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Layer index.
    #[arg(long)]
    layer: usize,
    /// safetensors file with tensor `hidden_states` [T, H].
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
    /// Run the CPU reference instead of the GPU.
    #[arg(long)]
    cpu: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("run_layer: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    let (cfg, weights) = ckpt.moe_block(args.layer)?;
    let hs = read_hidden_states(&args.input)?;
    if hs.hidden != cfg.hidden {
        return Err(format!(
            "the input's hidden size is {}, the model's {}",
            hs.hidden, cfg.hidden
        )
        .into());
    }
    let out: Vec<f32> = if args.cpu {
        moekit::reference::moe::forward(&cfg, &weights, &hs.values, hs.tokens)?.out
    } else {
        let ctx = Context::new(0)?;
        let s = ctx.stream();
        let mut layer = MoeLayer::new(s, cfg.clone(), &weights, hs.tokens.max(1))?;
        let x = moekit::testing::upload(s, &hs.values)?;
        let mut y = s.alloc_zeros::<half::bf16>((hs.tokens * hs.hidden).max(1))?;
        let n = hs.tokens * hs.hidden;
        layer.forward(s, &x.slice(..n), hs.tokens, &mut y.slice_mut(..n))?;
        s.clone_dtoh(&y.slice(..n))?
            .iter()
            .map(|v| v.to_f32())
            .collect()
    };
    write_hidden_states(&args.output, &out, hs.tokens, hs.hidden, hs.dtype)?;
    eprintln!(
        "run_layer: layer {} ({} experts, top-{}) on {} tokens -> {}",
        args.layer,
        cfg.num_experts(),
        cfg.top_k(),
        hs.tokens,
        args.output.display()
    );
    Ok(())
}
