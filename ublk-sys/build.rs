//! Build script of `ublk-sys`.
//!
//! Without the `bindgen` feature this does nothing: `src/lib.rs` includes the
//! committed `src/bindings.rs`.
//!
//! With the `bindgen` feature it runs bindgen on the vendored
//! `include/ublk_cmd.h` and writes `$OUT_DIR/bindings.rs`, which `src/lib.rs`
//! then includes instead of the committed copy. With
//! `UBLK_SYS_UPDATE_BINDINGS=1` the fresh output is also copied over
//! `src/bindings.rs`:
//!
//! ```text
//! UBLK_SYS_UPDATE_BINDINGS=1 cargo build -p ublk-rs-sys --features bindgen
//! ```

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=include/ublk_cmd.h");
    println!("cargo:rerun-if-changed=include/KERNEL_VERSION");
    println!("cargo:rerun-if-env-changed=UBLK_SYS_UPDATE_BINDINGS");

    #[cfg(feature = "bindgen")]
    generate::run();
}

#[cfg(feature = "bindgen")]
mod generate {
    use std::env;
    use std::fs;
    use std::path::PathBuf;

    use bindgen::callbacks::{IntKind, ParseCallbacks};

    /// Chooses the Rust type of integer macros.
    #[derive(Debug)]
    struct IntMacroTypes;

    impl ParseCallbacks for IntMacroTypes {
        fn int_macro(&self, name: &str, value: i64) -> Option<IntKind> {
            if name.starts_with("UBLK_F_") {
                // Feature bits, OR-ed into the `__u64 flags` of
                // `ublksrv_ctrl_dev_info` and returned by GET_FEATURES.
                Some(IntKind::U64)
            } else if value < 0 {
                None
            } else if u32::try_from(value).is_err() {
                Some(IntKind::U64)
            } else {
                None
            }
        }
    }

    pub(super) fn run() {
        let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
        let header = manifest_dir.join("include").join("ublk_cmd.h");

        let rust_target = bindgen::RustTarget::stable(85, 0)
            .unwrap_or_else(|e| panic!("bad bindgen rust target: {e}"));

        let bindings = bindgen::Builder::default()
            .header(header.to_str().expect("non-UTF-8 path to ublk_cmd.h"))
            // Reproducible output, independent of the host's rustfmt.
            .formatter(bindgen::Formatter::Prettyplease)
            .rust_target(rust_target)
            .use_core()
            .allowlist_item("ublk.*|UBLK.*|ublksrv.*|UBLKSRV.*")
            .derive_default(true)
            // bindgen can only implement `Default` for unions (and structs
            // holding them) with `unsafe` zeroing; `src/lib.rs` implements
            // it for these four types safely instead.
            .no_default("ublksrv_io_desc|ublksrv_io_cmd|ublksrv_io_desc__bindgen_ty_1|ublksrv_io_cmd__bindgen_ty_1")
            .derive_debug(true)
            .impl_debug(true)
            .derive_copy(true)
            .derive_eq(true)
            .derive_partialeq(true)
            .derive_hash(true)
            .explicit_padding(true)
            // `src/layout.rs` holds our own compile-time layout assertions,
            // checked against a C compiler's `sizeof`/`offsetof`.
            .layout_tests(false)
            .parse_callbacks(Box::new(IntMacroTypes))
            .generate()
            .expect("bindgen failed on include/ublk_cmd.h");

        let out = out_dir.join("bindings.rs");
        bindings
            .write_to_file(&out)
            .expect("cannot write $OUT_DIR/bindings.rs");

        if env::var_os("UBLK_SYS_UPDATE_BINDINGS").is_some_and(|v| v == "1") {
            let committed = manifest_dir.join("src").join("bindings.rs");
            fs::copy(&out, &committed).expect("cannot update src/bindings.rs");
            println!(
                "cargo:warning=ublk-sys: updated {} from bindgen output",
                committed.display()
            );
        }
    }
}
