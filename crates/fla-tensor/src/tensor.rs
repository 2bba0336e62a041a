use crate::{Error, Real, Result};

/// A dense row-major tensor on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<F> {
    shape: Vec<usize>,
    data: Vec<F>,
}

impl<F: Real> Tensor<F> {
    /// A tensor from its shape and row-major data; the lengths must agree.
    pub fn new(shape: Vec<usize>, data: Vec<F>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Invalid(format!(
                "shape {shape:?} holds {n} values but {} were given",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![F::ZERO; shape.iter().product()],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[F] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [F] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<F> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same values in another float type.
    pub fn cast<G: Real>(&self) -> Tensor<G> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|x| G::from_f64(x.to_f64())).collect(),
        }
    }

    /// Checks the shape (`pattern` names the dimensions, e.g. "[B, T, H, K]") and that every
    /// value is finite; the error names the tensor and the shape expected.
    pub fn expect_shape(&self, name: &str, want: &[usize], pattern: &str) -> Result<()> {
        if self.shape != want {
            let dims: Vec<String> = want.iter().map(|d| d.to_string()).collect();
            return Err(Error::Shape {
                name: name.into(),
                expected: format!("{pattern} = [{}]", dims.join(", ")),
                got: self.shape.clone(),
            });
        }
        self.check_finite(name)
    }

    /// The first non-finite value, as an error naming the tensor and the index.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match self.data.iter().position(|x| !x.is_finite()) {
            None => Ok(()),
            Some(flat) => Err(Error::NonFinite {
                name: name.to_string(),
                index: unravel(flat, &self.shape),
                value: self.data[flat].to_f64(),
            }),
        }
    }

    /// ||self - other|| / ||other|| in f64 (0 when both are zero).
    pub fn rel_err(&self, other: &Tensor<F>) -> f64 {
        assert_eq!(
            self.shape, other.shape,
            "rel_err on tensors of different shapes"
        );
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, b) in self.data.iter().zip(&other.data) {
            let (a, b) = (a.to_f64(), b.to_f64());
            num += (a - b) * (a - b);
            den += b * b;
        }
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }
}

/// The multi-index of a flat row-major position.
pub(crate) fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}
