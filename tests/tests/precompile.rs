//! Cold start: `exactly compile` precompiles the manifest's components and
//! `serve` loads them instead of compiling; a `.cwasm` that does not belong
//! to the `.wasm`, is damaged, or was compiled for other engine settings is
//! not loaded: `serve` compiles the `.wasm` instead, says why, and events are
//! processed all the same.
//!
//! Loading is the same on both storage backends; these tests run on SQLite.
//! `handler_load_duration_seconds{from=…}` tells how each handler was
//! loaded.

use std::path::{Path, PathBuf};

use exactly_e2e::app::{HandlerEntry, standard_handlers};
use exactly_e2e::{Backend, Event, Scrape, TestApp, TestEnv, json};

const HANDLERS: [&str; 3] = ["order-created", "order-payment", "testkit"];

fn loaded_from(scrape: &Scrape, handler: &str) -> &'static str {
    let precompiled = scrape.get(
        "handler_load_duration_seconds",
        &[("handler", handler), ("from", "precompiled")],
    );
    let compiled = scrape.get(
        "handler_load_duration_seconds",
        &[("handler", handler), ("from", "compiled")],
    );
    match (precompiled, compiled) {
        (Some(_), None) => "precompiled",
        (None, Some(_)) => "compiled",
        other => panic!("handler {handler} loaded {other:?}:\n{}", scrape.text()),
    }
}

async fn compile(env: &TestEnv, args: &[&str]) -> Vec<PathBuf> {
    let output = env.compile(args).await;
    assert!(
        output.status.success(),
        "exactly compile failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

async fn an_event_is_processed(app: &TestApp) {
    let event = Event::new("test.count").with_data(json!({"n": 1}));
    app.send_binary(&event).await.assert_processed();
    assert_eq!(app.effects(&event).await, 1);
}

/// The default place: `<name>.cwasm` next to `<name>.wasm`. The components
/// are copied into the test's folder first so that `dist/` is not touched.
#[tokio::test]
async fn compile_writes_next_to_the_wasm_and_serve_loads_it() {
    let components = tempfile::tempdir().expect("a temporary folder");
    let handlers: Vec<HandlerEntry> = standard_handlers()
        .into_iter()
        .map(|mut handler| {
            let copy = components
                .path()
                .join(handler.component.file_name().expect("a file name"));
            std::fs::copy(&handler.component, &copy).expect("copy the component");
            handler.component = copy;
            handler
        })
        .collect();
    let env = TestEnv::with_handlers(Backend::Sqlite, handlers).await;

    let written = compile(&env, &[]).await;
    assert_eq!(written.len(), 3);
    for handler in HANDLERS {
        let cwasm = components.path().join(format!("{handler}.cwasm"));
        assert!(written.contains(&cwasm), "{written:?}");
        assert!(cwasm.is_file() && std::fs::metadata(&cwasm).unwrap().len() > 0);
        assert!(
            components
                .path()
                .join(format!("{handler}.cwasm.json"))
                .is_file()
        );
    }

    let app = env.serve().await;
    let scrape = app.metrics().await;
    for handler in HANDLERS {
        assert_eq!(loaded_from(&scrape, handler), "precompiled");
    }
    an_event_is_processed(&app).await;
}

/// `--out-dir` for compile, `--precompiled-dir` for serve; then three ways a
/// `.cwasm` goes bad, each one falling back to compiling that handler only.
#[tokio::test]
async fn stale_damaged_or_foreign_cwasm_falls_back_to_compiling() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let out = env.dir().join("cwasm");
    let out_text = out.display().to_string();
    compile(&env, &["--out-dir", &out_text]).await;
    let cwasm = |handler: &str| out.join(format!("{handler}.cwasm"));
    let stamp = |handler: &str| out.join(format!("{handler}.cwasm.json"));

    // Stale: order-payment's files now hold order-created's compiled code,
    // valid for this engine but not made from order-payment.wasm.
    std::fs::copy(cwasm("order-created"), cwasm("order-payment")).unwrap();
    std::fs::copy(stamp("order-created"), stamp("order-payment")).unwrap();
    // Damaged: testkit's `.cwasm` loses its tail.
    let bytes = std::fs::read(cwasm("testkit")).unwrap();
    std::fs::write(cwasm("testkit"), &bytes[..bytes.len() / 2]).unwrap();

    let app = env.serve_with_flags(&["--precompiled-dir", &out_text]).await;
    let scrape = app.metrics().await;
    assert_eq!(loaded_from(&scrape, "order-created"), "precompiled");
    assert_eq!(loaded_from(&scrape, "order-payment"), "compiled");
    assert_eq!(loaded_from(&scrape, "testkit"), "compiled");
    let logs = app.logs();
    assert!(
        logs.contains("compiled from another version of the .wasm"),
        "{logs}"
    );
    assert!(logs.contains("not what `exactly compile` wrote"), "{logs}");
    an_event_is_processed(&app).await;
}

/// Compiled with fuel metering on (a manifest limit), served without: the
/// engines differ, so nothing precompiled is loaded, and serving works.
#[tokio::test]
async fn cwasm_of_other_engine_settings_is_not_loaded() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let out = env.dir().join("cwasm");
    let out_text = out.display().to_string();

    let metered = env.dir().join("metered.toml");
    let mut handlers = standard_handlers();
    handlers[2].limits = Some(exactly_e2e::HandlerLimits {
        fuel: Some(1_000_000_000),
        ..Default::default()
    });
    std::fs::write(&metered, exactly_e2e::app::manifest_toml(&handlers)).unwrap();
    let output = compile_with_manifest(&env, &metered, &out_text).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let app = env.serve_with_flags(&["--precompiled-dir", &out_text]).await;
    let scrape = app.metrics().await;
    for handler in HANDLERS {
        assert_eq!(loaded_from(&scrape, handler), "compiled");
    }
    assert!(
        app.logs().contains("compiled for other engine settings"),
        "{}",
        app.logs()
    );
    an_event_is_processed(&app).await;
}

/// `exactly compile --handlers <other manifest>`.
async fn compile_with_manifest(env: &TestEnv, manifest: &Path, out: &str) -> std::process::Output {
    env.compile(&[
        "--handlers",
        &manifest.display().to_string(),
        "--out-dir",
        out,
    ])
    .await
}
