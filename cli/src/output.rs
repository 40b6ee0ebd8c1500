//! Printing results: aligned tables for people, JSON for scripts.
use serde_json::Value;

use crate::client::Ctx;
use crate::Format;

/// Prints `rows` under `headers` as a table, or `json` in JSON mode.
pub fn print(ctx: &Ctx, headers: &[&str], rows: Vec<Vec<String>>, json: Value) {
    match ctx.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
        Format::Table => print!("{}", table(headers, &rows)),
    }
}

/// Prints a one-line message, or `json` in JSON mode.
pub fn message(ctx: &Ctx, text: &str, json: Value) {
    match ctx.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
        Format::Table => println!("{text}"),
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let t = table(
            &["ID", "ROLE"],
            &[
                vec!["1".into(), "leader".into()],
                vec!["22".into(), "follower".into()],
            ],
        );
        assert_eq!(t, "ID  ROLE\n1   leader\n22  follower\n");
    }
}
