//! Example programs (`examples/*.rs`) as executables for the tests that run them, such as
//! `blkcheck` and `vfio_probe`.
//!
//! Cargo gives integration tests the paths of the package's binaries (`CARGO_BIN_EXE_*`) but
//! not of its examples, and `cargo test --test NAME` does not build them at all. So
//! [`example_bin`] runs `cargo build --example NAME` (the cargo that built the test, on this
//! package, in the same target directory and profile) once per test process and takes the
//! executable's path from cargo's JSON messages. Under `cargo test` or
//! `cargo test --all-targets` the examples are already built and this costs about a second;
//! cargo releases its build lock before it runs the tests, so the nested build does not wait
//! for the outer one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long building an example may take: on a fresh target directory that is a build of the
/// dependencies too.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The executable of example `name`, built if needed. Panics (failing the test) when it
/// cannot be built.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    // Held across the build: tests of one process that need examples build them one by one.
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let path = build(name).unwrap_or_else(|e| panic!("cannot build example {name}: {e}"));
    built.insert(name.to_owned(), path.clone());
    path
}

fn build(name: &str) -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args([
            "--example",
            name,
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn cargo: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The executable of the compiler-artifact message for this example.
    let wanted = name.to_owned();
    let out_reader = thread::spawn(move || {
        let mut exe = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == wanted.as_str()
                && msg["target"]["kind"][0] == "example"
            {
                if let Some(path) = msg["executable"].as_str() {
                    exe = Some(PathBuf::from(path));
                }
            }
        }
        exe
    });
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("wait for cargo: {e}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cargo build took more than {BUILD_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stderr = err_reader.join().unwrap_or_default();
    let exe = out_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("cargo build --example {name}: {status}\n{stderr}"));
    }
    let exe =
        exe.ok_or_else(|| format!("cargo named no executable for example {name}\n{stderr}"))?;
    if !exe.is_file() {
        return Err(format!("{} does not exist", exe.display()));
    }
    Ok(exe)
}
