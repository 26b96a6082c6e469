//! `exactly dlq list` and `exactly dlq replay`: arguments, the database
//! they open, and the table `list` prints.

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::one_line;
use crate::printable::is_bidi_formatting;
use super::replay::{self, ReplayArgs};
use super::rows::{DeadLetter, Filter, connect, select};
use crate::database_args::DatabaseArgs;


#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List stored dead letters, newest first, with the error decoded.
    List(ListArgs),
    /// Send dead letters' original events again and record that it was done.
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// Only dead letters of this event type.
    #[arg(long = "type")]
    ty: Option<String>,

    /// Only dead letters received at or after this time: RFC 3339
    /// (`2026-11-27T14:00:00Z`) or a duration back from now (`1h`, `2d`).
    #[arg(long, value_parser = parse_time_bound)]
    since: Option<DateTime<Utc>>,

    /// Only dead letters received before this time (same forms as `--since`).
    #[arg(long, value_parser = parse_time_bound)]
    until: Option<DateTime<Utc>>,

    /// Only dead letters not yet replayed successfully.
    #[arg(long)]
    pending: bool,

    /// At most this many (the newest).
    #[arg(long, default_value_t = 100)]
    limit: u32,

    /// A JSON array instead of a table: every stored field, the error data
    /// both raw (base64) and decoded.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Replay(args) => replay::replay(args).await,
    }
}

/// `--since` / `--until`: RFC 3339, or a duration back from now.
fn parse_time_bound(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time (2026-11-27T14:00:00Z) nor a duration (1h, 30m, 2d)"))?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{text:?} is too long ago"))?;
    Utc::now().checked_sub_signed(ago).ok_or_else(|| format!("{text:?} is too long ago"))
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let database = connect(&args.database).await?;
    let filter = Filter { ty: args.ty.as_deref(), since: args.since, until: args.until, pending: args.pending, limit: args.limit };
    let dead_letters = select(&database, &filter).await?;
    if args.json {
        let all: Vec<serde_json::Value> = dead_letters.iter().map(DeadLetter::to_json).collect();
        println!("{}", escape_for_terminals(&serde_json::to_string_pretty(&all)?));
        return Ok(());
    }
    let header = ["ID", "RECEIVED", "TYPE", "SOURCE", "EVENT ID", "CODE", "DEST", "STORED AS", "STATE", "ERROR"];
    let rows: Vec<[String; 10]> = dead_letters
        .iter()
        .map(|d| {
            [
                d.dead_letter_id.to_string(),
                d.received_at.clone(),
                d.ty.clone(),
                d.source.clone(),
                d.id.clone(),
                d.error_code.clone().unwrap_or_else(|| "-".into()),
                d.error_dest.clone().unwrap_or_else(|| "-".into()),
                d.stored_as().to_owned(),
                d.state(),
                d.decoded_error().unwrap_or_else(|| "-".into()),
            ]
            .map(|cell| one_line(&cell))
        })
        .collect();
    print!("{}", table(&header, &rows));
    if rows.is_empty() {
        println!("(no dead letters)");
    }
    let raw: Vec<String> = dead_letters
        .iter()
        .filter_map(|d| d.problem.as_ref().map(|problem| format!("  {}: {}", d.dead_letter_id, one_line(problem))))
        .collect();
    if !raw.is_empty() {
        println!("\nStored as received, not as a valid CloudEvent (`dlq replay` sends them back as they came):");
        println!("{}", raw.join("\n"));
    }
    Ok(())
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// JSON text with the characters a terminal acts on escaped: serde_json
/// writes C1 controls (U+0080–U+009F, among them CSI) and bidirectional
/// formatting characters as they are; `\uXXXX` is the same JSON value.
fn escape_for_terminals(json: &str) -> String {
    json.chars()
        .map(|c| {
            let c1 = ('\u{80}'..='\u{9f}').contains(&c);
            if c1 || is_bidi_formatting(c) { format!("\\u{:04x}", c as u32) } else { c.to_string() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::rows::timestamp;
    use super::*;

    #[test]
    fn time_bounds_accept_rfc3339_and_durations_back_from_now() {
        let exact = parse_time_bound("2026-11-27T14:00:00+01:00").unwrap();
        assert_eq!(timestamp(exact), "2026-11-27T13:00:00.000Z");
        let hour_ago = parse_time_bound("1h").unwrap();
        let expected = Utc::now() - chrono::Duration::hours(1);
        assert!((hour_ago - expected).num_seconds().abs() < 5);
        assert!(parse_time_bound("yesterday-ish").is_err());
    }

    #[test]
    fn json_for_terminals_escapes_c1_and_bidi_and_stays_the_same_json() {
        let value = serde_json::json!({"s": "\u{9b}31mRED \u{202e}gnp.exe é"});
        let text = escape_for_terminals(&serde_json::to_string(&value).unwrap());
        assert!(!text.contains('\u{9b}') && !text.contains('\u{202e}') && text.contains('é'), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), value);
    }

    #[test]
    fn tables_align_and_keep_the_last_column_whole() {
        let text = table(&["A", "B"], &[["long".into(), "x y".into()]]);
        assert_eq!(text, "A     B\nlong  x y\n");
    }
}
