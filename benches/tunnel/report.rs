//! Samples, medians, the printed table and the JSON summary.

use std::collections::BTreeMap;

/// Every sample of every metric, per path.
#[derive(Default)]
pub struct Samples(BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>>);

impl Samples {
    pub fn add(&mut self, path: &'static str, metric: &'static str, value: f64) {
        self.0
            .entry(path)
            .or_default()
            .entry(metric)
            .or_default()
            .push(value);
    }

    pub fn median(&self, path: &str, metric: &str) -> Option<f64> {
        let mut v = self.0.get(path)?.get(metric)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// `{"medians": {path: {metric: x}}, "samples": {path: {metric: [x…]}}}` plus `meta`.
    pub fn json(&self, meta: serde_json::Value) -> serde_json::Value {
        let medians: BTreeMap<_, BTreeMap<_, _>> = self
            .0
            .iter()
            .map(|(p, m)| {
                let row = m
                    .keys()
                    .filter_map(|k| Some((*k, self.median(p, k)?)))
                    .collect();
                (*p, row)
            })
            .collect();
        serde_json::json!({ "meta": meta, "medians": medians, "samples": self.0 })
    }
}

/// One row of the table: a metric, its unit, and what a user has today.
pub struct Metric {
    pub key: &'static str,
    pub label: String,
    pub plugin: &'static str,
}

fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) if x >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    }
}

/// The markdown table: medians per path, tunnel ÷ direct, the plugin's figure.
pub fn table(s: &Samples, metrics: &[Metric], paths: &[(&'static str, String)]) -> String {
    let mut out = String::from("| metric |");
    let mut rule = String::from("|---|");
    for (i, (_, title)) in paths.iter().enumerate() {
        out += &format!(" {title} |");
        rule += "---:|";
        if i > 0 {
            out += " ÷ direct |";
            rule += "---:|";
        }
    }
    out += " plugin 1.2.677.0 (issue) |\n";
    rule += "---:|\n";
    out += &rule;
    for m in metrics {
        out += &format!("| {} |", m.label);
        let base = s.median(paths[0].0, m.key);
        for (i, (p, _)) in paths.iter().enumerate() {
            let v = s.median(p, m.key);
            out += &format!(" {} |", cell(v));
            if i > 0 {
                out += &format!(" {} |", ratio(v, base));
            }
        }
        out += &format!(" {} |\n", m.plugin);
    }
    out
}
