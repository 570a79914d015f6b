//! The Prometheus text exposition format (version 0.0.4), written by hand: one `# HELP` and
//! `# TYPE` per family, its samples right after, label values escaped.
//!
//! This module only formats; it never reads the agent's state. Callers keep every label set
//! bounded (routes, destinations, brokers, shards, reasons and error codes, never a device
//! or a topic).

use crate::metrics::Cumulative;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Accumulates one scrape's text.
#[derive(Default)]
pub(crate) struct Exposition {
    out: String,
}

/// A sample value: counters and most gauges are integers, the rest floats.
pub(crate) trait Value {
    fn write_to(&self, out: &mut String);
}

impl Value for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

impl Value for bool {
    fn write_to(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
    if labels.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    for (i, (name, value)) in labels.iter().copied().chain(extra).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

impl Exposition {
    /// Starts a family. Its samples must follow before the next family starts.
    pub(crate) fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    pub(crate) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Value,
    ) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        value.write_to(&mut self.out);
        self.out.push('\n');
        self
    }

    /// A one-sample family.
    pub(crate) fn single(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        value: impl Value,
    ) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram series.
    pub(crate) fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &Cumulative,
    ) -> &mut Self {
        let bucket = format!("{name}_bucket");
        for (le, count) in &h.buckets {
            let le = le.to_string();
            self.out.push_str(&bucket);
            write_labels(&mut self.out, labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {count}");
        }
        self.out.push_str(&bucket);
        write_labels(&mut self.out, labels, Some(("le", "+Inf")));
        let _ = writeln!(self.out, " {}", h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count)
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_histograms_are_well_formed() {
        let mut e = Exposition::default();
        e.family("edgeship_x_total", Kind::Counter, "An x.\nSecond line.")
            .sample("edgeship_x_total", &[("route", "a\"b\\c\nd")], 3u64);
        e.single("edgeship_ratio", Kind::Gauge, "A ratio.", 0.25f64);
        e.family("edgeship_lat_seconds", Kind::Histogram, "Latency.")
            .histogram(
                "edgeship_lat_seconds",
                &[("broker", "b")],
                &Cumulative {
                    buckets: vec![(0.5, 1), (1.0, 2)],
                    count: 3,
                    sum_seconds: 4.5,
                },
            );
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP edgeship_x_total An x.\\nSecond line.\n\
             # TYPE edgeship_x_total counter\n\
             edgeship_x_total{route=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP edgeship_ratio A ratio.\n\
             # TYPE edgeship_ratio gauge\n\
             edgeship_ratio 0.25\n\
             # HELP edgeship_lat_seconds Latency.\n\
             # TYPE edgeship_lat_seconds histogram\n\
             edgeship_lat_seconds_bucket{broker=\"b\",le=\"0.5\"} 1\n\
             edgeship_lat_seconds_bucket{broker=\"b\",le=\"1\"} 2\n\
             edgeship_lat_seconds_bucket{broker=\"b\",le=\"+Inf\"} 3\n\
             edgeship_lat_seconds_sum{broker=\"b\"} 4.5\n\
             edgeship_lat_seconds_count{broker=\"b\"} 3\n"
        );
    }
}
