//! Writes every fuzz target's seeds, one file per seed, to `DIR/TARGET/NAME` (DIR defaults
//! to `seeds` next to this crate's `Cargo.toml`). Each seed is a value of the target's input
//! type, encoded as the bytes `arbitrary` decodes back to it (checked).
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    let mut written = 0;
    for (target, name, bytes) in vubd_fuzz::seeds() {
        let t = dir.join(target);
        std::fs::create_dir_all(&t)?;
        std::fs::write(t.join(name), bytes)?;
        written += 1;
    }
    println!("{written} seeds written under {}", dir.display());
    Ok(())
}
