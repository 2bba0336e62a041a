//! The loss curve of a run as a small self-contained SVG.

use serde_json::Value;

/// Training loss against step (a polyline), with any `val_loss` points as dots.
pub fn loss_curve_svg(records: &[Value]) -> String {
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let (train, val) = (series("loss"), series("val_loss"));
    let (w, h, pad) = (640.0, 400.0, 56.0);
    let all = train.iter().chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_min = all
        .clone()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(0.0);
    let y_max = all
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(y_min + 1e-9);
    let px = |x: f64| pad + x / x_max * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y_min) / (y_max - y_min) * (h - 2.0 * pad);
    let points: Vec<String> = train
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let dots: String = val
        .iter()
        .map(|&(x, y)| {
            format!(
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
                px(x),
                py(y)
            )
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="{lx}" text-anchor="middle">0</text>
<text x="{r}" y="{lx}" text-anchor="middle">{x_max}</text>
<text x="{mid}" y="{lx2}" text-anchor="middle">step</text>
<text x="{ly}" y="{b}" text-anchor="end">{y_min:.3}</text>
<text x="{ly}" y="{ptop}" text-anchor="end">{y_max:.3}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>
{dots}
<text x="{r}" y="{legend}" text-anchor="end" fill="#1f77b4">training loss</text>
<text x="{r}" y="{legend2}" text-anchor="end" fill="#d62728">{val_label}</text>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        lx = h - pad + 16.0,
        lx2 = h - pad + 34.0,
        mid = w / 2.0,
        ly = pad - 6.0,
        ptop = pad + 4.0,
        pts = points.join(" "),
        legend = pad - 24.0,
        legend2 = pad - 10.0,
        val_label = if val.is_empty() {
            ""
        } else {
            "validation loss"
        },
    )
}
