//! The Prometheus text exposition of every process's `/metrics`: one writer, so every family
//! is written the same way (HELP, TYPE, then its samples), every sample carries the
//! process's identity label, and every label value and help text is escaped. No global
//! recorder: `cim up` runs a route and two servers in one process, each with its own page.

use std::fmt::{self, Display, Write as _};

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        })
    }
}

/// One `/metrics` page being written.
#[derive(Debug)]
pub struct Exposition {
    /// `key="value"`, escaped: the process's identity (`route_id`, `server_id`), first on
    /// every sample.
    identity: String,
    out: String,
}

impl Exposition {
    /// A page whose every sample is labelled `key="value"` (e.g. `route_id="r1"`).
    pub fn new(key: &str, value: &str) -> Self {
        Self {
            identity: format!("{key}=\"{}\"", escape_label(value)),
            out: String::new(),
        }
    }

    /// Starts the family `name`: its HELP and TYPE lines. Add its samples to what this
    /// returns (a family may have none: a value not known yet).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        Family {
            page: self,
            name: name.to_owned(),
        }
    }

    /// A family of one sample, labelled with the identity only.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help).sample(&[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The family being written: add its samples.
#[derive(Debug)]
pub struct Family<'a> {
    page: &'a mut Exposition,
    name: String,
}

impl Family<'_> {
    /// One sample, with `labels` after the identity.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.series("", labels, value)
    }

    /// One sample of the series `{name}{suffix}` (a histogram's `_bucket`, `_sum`, `_count`).
    pub fn series(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        let out = &mut self.page.out;
        let _ = write!(out, "{}{suffix}{{{}", self.name, self.page.identity);
        for (key, label) in labels {
            let _ = write!(out, ",{key}=\"{}\"", escape_label(label));
        }
        let _ = writeln!(out, "}} {value}");
        self
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_carry_the_identity_and_escape_every_label_and_help() {
        let mut page = Exposition::new("route_id", "r\"1\\\n");
        page.single("x_total", Kind::Counter, "Counts x.\nTwo lines \\ one.", 3);
        page.family("y", Kind::Gauge, "Y by kind.")
            .sample(&[("kind", "a\"b")], 1)
            .sample(&[("kind", "c"), ("le", "+Inf")], 2.5);
        page.family("z", Kind::Histogram, "Z.")
            .series("_count", &[], 4);
        page.family("empty", Kind::Gauge, "Nothing known yet.");
        let id = r#"route_id="r\"1\\\n""#;
        assert_eq!(
            page.finish(),
            format!(
                "# HELP x_total Counts x.\\nTwo lines \\\\ one.\n# TYPE x_total counter\n\
                 x_total{{{id}}} 3\n\
                 # HELP y Y by kind.\n# TYPE y gauge\n\
                 y{{{id},kind=\"a\\\"b\"}} 1\n\
                 y{{{id},kind=\"c\",le=\"+Inf\"}} 2.5\n\
                 # HELP z Z.\n# TYPE z histogram\n\
                 z_count{{{id}}} 4\n\
                 # HELP empty Nothing known yet.\n# TYPE empty gauge\n"
            )
        );
    }
}
