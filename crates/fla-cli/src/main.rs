//! The `fla` command.

mod bench;
mod bench_cuda;
mod bench_generate;
mod bench_train;
mod forward;
mod init;
mod lm;
mod op;
mod train;

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
    /// Run a GLA model directory on input_ids: logits, loss and parameter gradients.
    Forward(forward::ForwardArgs),
    /// Write a freshly initialised GLA model directory from a config.json.
    Init(init::InitArgs),
    /// Train a GLA model: MQAR by default, or a language model on text (--data).
    Train(train::TrainCmd),
    /// Perplexity and bits per byte of a model on text files.
    Eval(lm::EvalArgs),
    /// Continue a prompt with a model (prefill chunkwise, then one recurrent step per token).
    Generate(lm::GenerateArgs),
    /// Tokenizers for language models.
    #[command(subcommand)]
    Tokenizer(lm::TokenizerCmd),
    /// Print speed tables.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Op(args) => op::run(&args),
        Command::Bench(cmd) => bench::run(&cmd),
        Command::Forward(args) => forward::run(&args),
        Command::Init(args) => init::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => lm::eval(&args),
        Command::Generate(args) => lm::generate_cmd(&args),
        Command::Tokenizer(cmd) => lm::tokenizer_cmd(&cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
