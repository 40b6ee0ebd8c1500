//! Prometheus exposition formats for agents' and servers' `/metrics`.
//!
//! prometheus-client writes OpenMetrics text. Prometheus' own text format
//! (0.0.4) is what `promtool check metrics`, many scrapers and Prometheus
//! servers that do not ask for OpenMetrics read. [`negotiate`] picks one
//! from a scraper's `Accept` header, OpenMetrics only when it is asked for
//! by name (as Prometheus asks), and [`to_text_004`] rewrites OpenMetrics
//! into 0.0.4.
use std::collections::HashMap;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text004,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::Text004 => TEXT_004,
        }
    }

    /// `openmetrics` (as prometheus-client writes it) in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::Text004 => to_text_004(&openmetrics),
        }
    }
}

/// The format for a request with this `Accept` header: OpenMetrics when an
/// `application/openmetrics-text` range is accepted (q > 0) at least as
/// much as any `text/plain` range; Prometheus text 0.0.4 otherwise (no
/// header, `*/*`, `text/plain`, anything else).
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text004;
    };
    let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |best| best.max(q)));
    }
    match openmetrics {
        Some(q) if q > 0.0 && q >= text.unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Text004,
    }
}

/// Where a sample line's label set ends (after its `}`, skipping quoted
/// label values), or where its name ends when it has none.
fn label_set_end(line: &str) -> usize {
    let Some(open) = line.find(['{', ' ']) else {
        return line.len();
    };
    if line.as_bytes()[open] == b' ' {
        return open;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return open + i + 1,
            _ => {}
        }
    }
    line.len()
}

/// Rewrites OpenMetrics text into Prometheus text 0.0.4: a counter's HELP
/// and TYPE name its samples (`x_total`), an info metric becomes a gauge
/// named `x_info`, `unknown` and `gaugehistogram` become `untyped`; `# UNIT` and `# EOF` lines
/// and exemplars go.
pub fn to_text_004(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        let Some((prefix, rest)) = meta else {
            // A sample: drop an exemplar (" # {...} value").
            // An exemplar follows the value, after the label set.
            let labels_end = label_set_end(line);
            let sample = match line[labels_end..].find(" # {") {
                Some(at) => &line[..labels_end + at],
                None => line,
            };
            out.push_str(sample);
            out.push('\n');
            continue;
        };
        let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let kind = types.get(name).copied().unwrap_or("untyped");
        let name = match kind {
            "counter" if !name.ends_with("_total") => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_string(),
        };
        let text = match (prefix, text) {
            ("# TYPE ", "info" | "stateset") => "gauge",
            ("# TYPE ", "unknown") => "untyped",
            // Its samples (_gcount, _gsum) are no 0.0.4 histogram's.
            ("# TYPE ", "gaugehistogram") => "untyped",
            (_, text) => text,
        };
        out.push_str(prefix);
        out.push_str(&name);
        out.push(' ');
        out.push_str(text);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for_by_name() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(negotiate(None), Format::Text004);
        assert_eq!(negotiate(Some("*/*")), Format::Text004);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text004);
        assert_eq!(
            negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Text004
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text; q=0")),
            Format::Text004
        );
        assert_eq!(
            negotiate(Some("Application/OpenMetrics-Text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn counters_info_and_eof_are_rewritten_for_0_0_4() {
        let om = "\
# HELP weft_x_opened Connections opened.
# TYPE weft_x_opened counter
weft_x_opened_total{source=\"web # {x}\"} 3 # {trace_id=\"a\"} 1
# HELP weft_x_active Open now.
# TYPE weft_x_active gauge
# UNIT weft_x_active connections
weft_x_active 1
# HELP weft_x_build Build.
# TYPE weft_x_build info
weft_x_build_info{version=\"1\"} 1
# HELP weft_x_seconds Latency.
# TYPE weft_x_seconds histogram
weft_x_seconds_bucket{le=\"+Inf\"} 2
weft_x_seconds_sum 0.5
weft_x_seconds_count 2
# EOF
";
        let text = to_text_004(om);
        assert_eq!(
            text,
            "\
# HELP weft_x_opened_total Connections opened.
# TYPE weft_x_opened_total counter
weft_x_opened_total{source=\"web # {x}\"} 3
# HELP weft_x_active Open now.
# TYPE weft_x_active gauge
weft_x_active 1
# HELP weft_x_build_info Build.
# TYPE weft_x_build_info gauge
weft_x_build_info{version=\"1\"} 1
# HELP weft_x_seconds Latency.
# TYPE weft_x_seconds histogram
weft_x_seconds_bucket{le=\"+Inf\"} 2
weft_x_seconds_sum 0.5
weft_x_seconds_count 2
"
        );
    }
}
