//! `fla init`: a freshly initialised model directory from a config.json.

use std::path::PathBuf;

use clap::Args;
use fla_model::checkpoint::save_model;
use fla_model::{GlaConfig, Model};
use fla_tensor::{Error, Result};

#[derive(Args)]
pub struct InitArgs {
    /// A config.json (model_type "gla"; fields absent take fla's defaults)
    #[arg(long)]
    config: PathBuf,
    /// The model directory to create; an existing model there is not overwritten
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: &InitArgs) -> Result<()> {
    let config = GlaConfig::from_file(&a.config)?;
    if a.output.join("model.safetensors").exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a model; choose another --output",
            a.output.display()
        )));
    }
    let model = Model::<f32>::new(config, a.seed);
    save_model(&model, &a.output)?;
    println!(
        "{}: {} parameters",
        a.output.display(),
        model.layout.num_params()
    );
    Ok(())
}
