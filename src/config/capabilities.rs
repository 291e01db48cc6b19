//! `--print-capabilities`, of QEMU's vhost-user backend program conventions (vhost-user.rst,
//! "Backend program conventions"): the backend prints its capabilities as JSON and exits
//! successfully, and other options and arguments are then ignored, valid or not.

use std::ffi::OsString;

use clap::Parser;

use super::Args;

/// The option that asks for the capabilities.
const FLAG: &str = "--print-capabilities";

/// `argv` (the program name first) through clap. With `--print-capabilities` among the
/// options, only that option is parsed: the conventions ignore the others, and clap would
/// refuse some of them first (an unknown option, a missing value, two that conflict).
pub fn parse_args(argv: impl IntoIterator<Item = OsString>) -> Result<Args, clap::Error> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    if asks_for_capabilities(argv.iter().skip(1)) {
        let program = argv.first().cloned().unwrap_or_else(|| "vubd".into());
        return Args::try_parse_from([program, FLAG.into()]);
    }
    Args::try_parse_from(argv)
}

/// Whether `args` hold `--print-capabilities` as an option: anywhere before a `--`, after
/// which every argument is a value.
fn asks_for_capabilities<'a>(args: impl IntoIterator<Item = &'a OsString>) -> bool {
    args.into_iter()
        .take_while(|a| *a != "--")
        .any(|a| *a == FLAG)
}

/// What `--print-capabilities` prints: a block backend, with the conventions' optional
/// block options vubd takes (`--read-only`, `--blk-file`).
pub fn capabilities_json() -> String {
    serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Command;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        parse_args(
            std::iter::once("vubd")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn capabilities_follow_the_conventions() {
        let v: serde_json::Value = serde_json::from_str(&capabilities_json()).expect("json");
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
    }

    #[test]
    fn print_capabilities_ignores_every_other_argument_valid_or_not() {
        for args in [
            &["--print-capabilities"][..],
            &["--no-such-option", "--print-capabilities"],
            &["--print-capabilities", "--no-such-option"],
            &["--device", "garbage", "--print-capabilities"],
            &["--socket-path", "a", "--fd", "3", "--print-capabilities"],
            &["--num-queues", "--print-capabilities"],
            &["--num-queues", "x", "--print-capabilities"],
            &["ctl", "version", "--print-capabilities"],
            &["--disk", "x.img", "--print-capabilities", "stray"],
        ] {
            let parsed = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(
                matches!(Command::try_from(parsed), Ok(Command::PrintCapabilities)),
                "{args:?}"
            );
        }
    }

    #[test]
    fn print_capabilities_after_the_end_of_the_options_is_a_value() {
        assert!(!asks_for_capabilities(
            ["--", "--print-capabilities"].map(OsString::from).iter()
        ));
        assert!(parse(&["--no-such-option", "--", "--print-capabilities"]).is_err());
        let e = parse(&["--no-such-option"]).expect_err("an unknown option");
        assert!(e.to_string().contains("--no-such-option"), "{e}");
    }
}
