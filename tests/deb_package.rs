//! The Debian package as `dist/debian/build-deb.sh` builds it with cargo-deb, from the vubd
//! under test (`--binary`: the debug build cargo made for this test, not a release build of
//! several minutes; the package's layout and metadata are the same). Checked with dpkg's own
//! tools: every path and its mode (`dpkg-deb -c`), the control fields (`-f`), the maintainer
//! scripts (`-e`: the units are neither enabled nor started, nor stopped by an upgrade), the
//! dependencies satisfiable here (`apt-get install -s`, a simulation), and the extracted tree
//! (`-x`): the binary runs, the man page names every top-level option, the units and the QEMU
//! descriptor name /usr/bin/vubd, the example configuration parses.
//!
//! Nothing is installed: a real `dpkg -i` runs the maintainer scripts against the machine's
//! systemd and replaces whatever /usr/bin/vubd it has, and `dpkg --root` runs them chrooted in
//! the new root, which would need a whole Debian system in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;
use vubd::config::{Args, Config};

fn top() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// The package built into `dir`, and its path.
fn build_package(dir: &Path) -> PathBuf {
    run(Command::new(top().join("dist/debian/build-deb.sh"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_vubd"))
        .arg("--output")
        .arg(dir)
        // Quicker compression: the test reads the package once.
        .args(["--", "--fast"]));
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the output directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package in {}: {debs:?}", dir.display());
    debs.into_iter().next().expect("one package")
}

/// `dpkg-deb -c`: each file's path (without the leading `.`) and its mode and owner, as
/// `-rw-r--r-- 0/0`.
fn listing(deb: &Path) -> BTreeMap<String, String> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let path = words.last().expect("a path").trim_start_matches('.');
            (path.to_owned(), format!("{} {}", words[0], words[1]))
        })
        .collect()
}

#[test]
fn the_package_holds_the_binary_units_descriptor_man_page_and_docs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let deb = build_package(dir.path());

    let file = "-rw-r--r-- 0/0";
    let expected: BTreeMap<String, String> = [
        ("/usr/bin/vubd", "-rwxr-xr-x 0/0"),
        ("/usr/lib/systemd/system/vubd.service", file),
        ("/usr/lib/systemd/system/vubd@.service", file),
        ("/usr/lib/systemd/system/vubd@.socket", file),
        ("/usr/share/qemu/vhost-user/50-vubd.json", file),
        ("/usr/share/man/man1/vubd.1.gz", file),
        ("/usr/share/doc/vubd/copyright", file),
        ("/usr/share/doc/vubd/README.md", file),
        ("/usr/share/doc/vubd/examples/vubd.toml", file),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_owned(), m.to_owned()))
    .collect();
    assert_eq!(listing(&deb), expected);

    // The control fields.
    let field = |name: &str| stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "vubd");
    assert_eq!(
        field("Version").trim(),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture").trim(), arch.trim());
    assert_eq!(field("Section").trim(), "admin");
    assert_eq!(field("Priority").trim(), "optional");
    assert!(
        field("Maintainer").trim().ends_with('>'),
        "a name and an address"
    );
    // $auto: dpkg-shlibdeps's, from the libraries the binary links.
    assert!(
        field("Depends").starts_with("libc6 (>= "),
        "{}",
        field("Depends")
    );
    let description = field("Description");
    let mut lines = description.lines();
    assert_eq!(
        lines.next(),
        Some(env!("CARGO_PKG_DESCRIPTION")),
        "the synopsis, one line"
    );
    assert!(lines.count() >= 5, "an extended description: {description}");
    // `dpkg-deb -I` reads the whole control archive: it names the scripts it holds.
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(&format!(" {script} ")), "{script} in {info}");
    }

    // The maintainer scripts that cargo-deb wrote as dh_installsystemd does, for the node
    // daemon (a template has no unit to enable without an instance).
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let script = |name: &str| std::fs::read_to_string(control.join(name)).expect(name);
    let postinst = script("postinst");
    // Enabled again only if the admin had enabled it before (an upgrade), never started.
    assert!(postinst.contains("was-enabled vubd.service"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke"), "{postinst}");
    // Stopped when the package goes, not by an upgrade, and not restarted.
    let prerm = script("prerm");
    assert!(
        prerm.contains(r#"[ "$1" = remove ]"#) && prerm.contains("stop vubd.service"),
        "{prerm}"
    );
    assert!(!postinst.contains("restart") && !prerm.contains("restart"));

    // Installable here: its dependencies resolve (a simulation, which changes nothing).
    let simulated = stdout(
        Command::new("apt-get")
            .args(["install", "-s", "--no-install-recommends"])
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    assert!(
        simulated.contains("Inst vubd (") && simulated.contains("Conf vubd ("),
        "{simulated}"
    );

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    check_extracted(&root);
}

fn check_extracted(root: &Path) {
    // The binary runs, and is the one a QEMU descriptor asks for capabilities.
    let caps = stdout(Command::new(root.join("usr/bin/vubd")).arg("--print-capabilities"));
    let caps: serde_json::Value = serde_json::from_str(&caps).expect("capabilities JSON");
    assert_eq!(caps["type"], "block", "{caps}");

    // The descriptor: the repository's, but with the packaged binary.
    let read_json = |path: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the descriptor"))
            .expect("descriptor JSON")
    };
    let packaged = read_json(&root.join("usr/share/qemu/vhost-user/50-vubd.json"));
    let mut repo = read_json(&top().join("qemu/50-vubd.json"));
    assert_eq!(packaged["binary"], "/usr/bin/vubd");
    repo["binary"] = "/usr/bin/vubd".into();
    assert_eq!(packaged, repo);

    // The units: dist/systemd's with the packaged binary; ExecStart= names it.
    for unit in ["vubd.service", "vubd@.service", "vubd@.socket"] {
        let packaged = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit))
            .expect("read the packaged unit");
        let repo =
            std::fs::read_to_string(top().join("dist/systemd").join(unit)).expect("read the unit");
        assert_eq!(
            packaged,
            repo.replace("/usr/local/bin/vubd", "/usr/bin/vubd")
        );
        assert!(!packaged.contains("/usr/local"), "{unit}");
        if unit.ends_with(".service") {
            assert!(packaged.contains("\nExecStart=/usr/bin/vubd "), "{unit}");
        }
    }

    check_man_page(&root.join("usr/share/man/man1/vubd.1.gz"));

    // The example configuration is one vubd takes. Its images are examples, opened when vubd
    // serves, not when it reads the file; its sockets' directory must exist, so they go to
    // one that does.
    let example = root.join("usr/share/doc/vubd/examples/vubd.toml");
    let text = std::fs::read_to_string(&example).expect("read the example");
    let run_dir = root.join("run");
    std::fs::create_dir(&run_dir).expect("mkdir");
    let tried = run_dir.join("vubd.toml");
    let text = text.replace("/run/vubd", &run_dir.display().to_string());
    std::fs::write(&tried, text).expect("write");
    let config = Config::from_args([
        "--config".as_ref(),
        tried.as_os_str(),
        "--control-socket".as_ref(),
        run_dir.join("control.sock").as_os_str(),
    ]);
    let config = config.unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    assert_eq!(config.devices.len(), 2, "{}", example.display());

    let copyright =
        std::fs::read_to_string(root.join("usr/share/doc/vubd/copyright")).expect("read copyright");
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    for license in ["Apache-2.0 or MIT", "Apache-2.0", "MIT", "BSD-3-Clause"] {
        assert!(
            copyright.contains(&format!("\nLicense: {license}\n")),
            "{license}"
        );
    }
}

/// Gzipped, a man page of section 1, naming every option of the top level and every
/// subcommand of the clap definition vubd parses its command line with.
fn check_man_page(path: &Path) {
    let page = stdout(Command::new("gzip").arg("-dc").arg(path));
    assert!(page.contains("\n.TH vubd 1 "), "{page}");
    // roff writes a hyphen `\-`. The synopsis names every option too: they are looked for in
    // the section that says what each does.
    let page = page.replace(r"\-", "-");
    let (_, options) = page
        .split_once("\n.SH OPTIONS\n")
        .expect("an OPTIONS section");
    let cli = Args::command();
    let mut named = 0;
    for arg in cli.get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long() {
            assert!(
                options.contains(&format!("--{long}")),
                "--{long} in the man page"
            );
            named += 1;
        }
    }
    // The clap definition's options are there to check: --disk, --device, --config, ...
    assert!(named >= 20, "{named} options");
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        assert!(options.contains(name), "subcommand {name} in the man page");
    }
}
