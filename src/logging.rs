//! Logging: `env_logger` under `RUST_LOG` (default `info`), to stderr.
//!
//! One filter on top: tungstenite's trace level prints every frame's payload, and a
//! socket `refresh` frame carries an access token. Tokens never reach the log, so
//! those records are dropped whatever `RUST_LOG` says.

use log::{Level, Log, Metadata, Record};

struct Redacting(env_logger::Logger);

/// Whether a record could carry frame payloads (and so tokens).
fn may_carry_secrets(meta: &Metadata<'_>) -> bool {
    meta.level() == Level::Trace && meta.target().starts_with("tungstenite")
}

impl Log for Redacting {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        !may_carry_secrets(meta) && self.0.enabled(meta)
    }

    fn log(&self, record: &Record<'_>) {
        if !may_carry_secrets(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Installs the logger; call once, first thing.
pub fn init() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(Redacting(logger))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_traces_are_withheld() {
        let trace = Metadata::builder()
            .level(Level::Trace)
            .target("tungstenite::protocol")
            .build();
        let debug = Metadata::builder()
            .level(Level::Debug)
            .target("tungstenite::protocol")
            .build();
        let ours = Metadata::builder()
            .level(Level::Trace)
            .target("parley::ws")
            .build();
        assert!(may_carry_secrets(&trace));
        assert!(!may_carry_secrets(&debug));
        assert!(!may_carry_secrets(&ours));
    }
}
