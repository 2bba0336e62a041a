//! The gated linear attention family on the CPU.
//!
//! One recurrence (../../docs/ARCHITECTURE.md), `S_t = (exp(gk_t)^T exp(gv_t)) ⊙ S_{t-1} + k_t^T v_t`,
//! `o_t = scale · q_t S_t`, in four forms that give the same outputs and gradients:
//! [`Form::Naive`] (quadratic, the reference), [`Form::Recurrent`], [`Form::Chunk`]
//! (chunk states materialised, then all chunks in parallel) and [`Form::FusedChunk`]
//! (one sweep over chunks). [`mamba`] holds the selective scan, whose gate is a full matrix.

pub mod gla;
pub mod linalg;
pub mod mamba;

pub use gla::{
    backward_in_segments, forward_in_segments, gla_backward, gla_forward, Form, GateKind, GlaGrads,
    GlaInputs, GlaOutputs, Options,
};
