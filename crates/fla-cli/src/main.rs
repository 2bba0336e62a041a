//! The `fla` command.

mod bench;
mod op;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fla",
    version,
    about = "Gated linear attention: ops, benchmarks and models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one op on the tensors of a safetensors file (the exchange format of docs/ARCHITECTURE.md).
    Op(op::OpArgs),
    /// Print speed tables.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Op(args) => op::run(&args),
        Command::Bench(cmd) => bench::run(&cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// `--device auto|cpu|cuda[:N]`: only the CPU back end exists so far.
pub fn check_device(device: &str) -> fla_tensor::Result<()> {
    match device {
        "auto" | "cpu" => Ok(()),
        d if d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()) =>
        {
            Err(fla_tensor::Error::Invalid(format!(
                "device `{d}`: this build has no CUDA back end yet; use --device cpu"
            )))
        }
        d => Err(fla_tensor::Error::Invalid(format!(
            "unknown device `{d}` (expected auto, cpu or cuda[:N])"
        ))),
    }
}
