//! The manifests under `deploy/` held against the code they deploy.
//!
//! Every YAML file is parsed, the kustomize base and both overlays are
//! rendered (tests/src/deploy.rs), and each claim a manifest makes about
//! `exactly` is checked against the binary or the files it reads: the port,
//! the probe paths (asked of a running `exactly`), the environment variables
//! (read off `exactly serve --help`), the Triggers' event types (the image's
//! handler manifest), the dead-letter path, and the files the image holds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use exactly_e2e::app::{exactly_binary, repo_root};
use exactly_e2e::deploy::{
    Containerfile, ImageManifest, containers, deploy_dir, kustomization_files, kustomize,
    object_key, yaml_documents,
};
use exactly_e2e::{Backend, TestApp};
use serde_json::Value;

/// Where the Triggers send dead-lettered events: exactly's dead-letter sink
/// (`exactly::dlq::PATH`; the running binary is asked below).
const DEAD_LETTER_PATH: &str = "/dead-letter";

/// Knative sets these in every container itself and refuses a Service
/// that sets them.
const KNATIVE_RESERVED_ENV: &[&str] = &["PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"];

const OVERLAYS: &[&str] = &["dev", "production"];

/// The base and every overlay, rendered.
fn renderings() -> Vec<(String, Vec<Value>)> {
    let mut all = vec![("base".to_owned(), kustomize(&deploy_dir().join("base")))];
    for overlay in OVERLAYS {
        all.push((
            format!("overlays/{overlay}"),
            kustomize(&deploy_dir().join("overlays").join(overlay)),
        ));
    }
    all
}

fn overlay(name: &str) -> Vec<Value> {
    kustomize(&deploy_dir().join("overlays").join(name))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .collect()
}

#[track_caller]
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} among {:?}", keys(objects)))
}

fn keys(objects: &[Value]) -> Vec<String> {
    objects.iter().map(object_key).collect()
}

/// The Knative Service `exactly`.
#[track_caller]
fn exactly_service(objects: &[Value]) -> &Value {
    let service = find(objects, "Service", "exactly");
    assert_eq!(service["apiVersion"], "serving.knative.dev/v1");
    service
}

/// The one container of the Knative Service.
#[track_caller]
fn exactly_container(objects: &[Value]) -> &Value {
    let found = containers(exactly_service(objects));
    assert_eq!(found.len(), 1, "the exactly Service runs one container");
    found[0]
}

/// An environment variable's literal value in the container.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|variable| variable["name"] == name)?["value"]
        .as_str()
}

#[track_caller]
fn number(value: &Value, what: &str) -> u64 {
    match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{what} is {value}, not a whole number"))
}

/// `"10s"`, `"250ms"`, `"2m"` in milliseconds.
#[track_caller]
fn duration_ms(text: &str) -> u64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or_else(|| panic!("{text:?} has no unit"));
    let (count, unit) = text.split_at(split);
    let count: u64 = count
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a duration"));
    count
        * match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            other => panic!("{text:?}: unknown unit {other}"),
        }
}

/// `"1Gi"`, `"256Mi"` in MiB.
#[track_caller]
fn quantity_mib(text: &str) -> u64 {
    if let Some(gib) = text.strip_suffix("Gi") {
        gib.parse::<u64>().expect("a whole number of GiB") * 1024
    } else if let Some(mib) = text.strip_suffix("Mi") {
        mib.parse().expect("a whole number of MiB")
    } else {
        panic!("{text:?}: use Mi or Gi")
    }
}

/// `exactly serve --help`, as the binary the tests run prints it, with no
/// variable of ours set (clap shows a set variable's value).
fn serve_help() -> String {
    let mut command = Command::new(exactly_binary());
    command.args(["serve", "--help"]).env("NO_COLOR", "1");
    for (name, _) in std::env::vars() {
        if name == "PORT" || name == "DATABASE_URL" || name.starts_with("EXACTLY_") {
            command.env_remove(name);
        }
    }
    let output = command.output().expect("run exactly serve --help");
    assert!(
        output.status.success(),
        "exactly serve --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// Every `[env: NAME=…]` (or `[env: NAME]`) of the help text.
fn env_names_in_help(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(at, marker)| {
            help[at + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The `[default: …]` of one option in the help text.
#[track_caller]
fn default_of(help: &str, option: &str) -> String {
    let start = help
        .find(&format!("{option} <"))
        .unwrap_or_else(|| panic!("{option} is not in exactly serve --help:\n{help}"));
    // The option's block ends where the next option starts.
    let block = &help[start..];
    let end = block[option.len()..]
        .find("\n  -")
        .map_or(block.len(), |end| end + option.len());
    let block = &block[..end];
    let default = block
        .split("[default: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{option} shows no default:\n{block}"));
    default[..default.find(']').expect("[default: …]")].to_owned()
}

/// Every file below `dir` whose name ends in one of `extensions`.
fn files_below(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read a deploy folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            found.extend(files_below(&path, extensions));
        } else if extensions
            .iter()
            .any(|extension| path.extension().is_some_and(|found| found == *extension))
        {
            found.push(path);
        }
    }
    found
}

#[test]
fn every_manifest_parses_and_an_overlay_uses_it() {
    let yaml_files = files_below(&deploy_dir(), &["yaml", "yml"]);
    assert!(yaml_files.len() >= 10, "deploy/ holds {yaml_files:?}");
    for file in &yaml_files {
        let documents = yaml_documents(file);
        assert!(!documents.is_empty(), "{} is empty", file.display());
        for document in documents {
            assert!(
                document["apiVersion"].is_string() && document["kind"].is_string(),
                "{}: a document without apiVersion and kind: {document}",
                file.display()
            );
            if document["kind"] != "Kustomization" {
                assert!(
                    document["metadata"]["name"].is_string(),
                    "{}: {} has no metadata.name",
                    file.display(),
                    object_key(&document)
                );
            }
        }
    }

    // Every file an overlay names exists, and every YAML file under
    // deploy/ is named by an overlay: nothing is dead or dangling.
    let mut used = BTreeSet::new();
    for overlay in OVERLAYS {
        for file in kustomization_files(&deploy_dir().join("overlays").join(overlay)) {
            let file = file
                .canonicalize()
                .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            used.insert(file);
        }
    }
    for file in &yaml_files {
        let file = file.canonicalize().expect("a listed file exists");
        assert!(
            used.contains(&file),
            "{} is not used by any overlay",
            file.display()
        );
    }
}

#[test]
fn overlays_patch_only_what_the_base_declares() {
    let base = kustomize(&deploy_dir().join("base"));
    let base_keys: BTreeSet<String> = keys(&base).into_iter().collect();
    for (name, objects) in renderings() {
        let rendered: BTreeSet<String> = keys(&objects).into_iter().collect();
        assert_eq!(
            rendered, base_keys,
            "{name} renders other objects than the base"
        );
        assert_eq!(
            rendered.len(),
            objects.len(),
            "{name} declares an object twice"
        );
        for object in &objects {
            if object["kind"] != "Namespace" {
                assert_eq!(
                    object["metadata"]["namespace"],
                    "exactly",
                    "{name}: {} is outside the exactly namespace",
                    object_key(object)
                );
            }
        }
        // The overlay's image is what it says, not the base's placeholder.
        let image = exactly_container(&objects)["image"]
            .as_str()
            .unwrap_or_default();
        if name == "base" {
            assert_eq!(image, "exactly");
        } else {
            assert!(
                image.contains('/') && (image.contains(':') || image.contains('@')),
                "{name}: the image {image:?} is not a full reference"
            );
        }
    }
    assert!(
        exactly_container(&overlay("dev"))["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("dev.local/")),
        "the dev image must skip Knative's tag resolution (dev.local/)"
    );
}

#[test]
fn the_container_port_is_port_and_the_binary_default() {
    let containerfile = Containerfile::load();
    let help = serve_help();
    let binary_default: u16 = default_of(&help, "--port")
        .parse()
        .expect("--port's default is a port");
    let image_port: u16 = containerfile
        .env
        .get("PORT")
        .expect("the Containerfile sets ENV PORT")
        .parse()
        .expect("ENV PORT is a port");
    assert_eq!(
        image_port, binary_default,
        "the image's PORT and the binary's default differ"
    );
    assert_eq!(
        containerfile.expose,
        [image_port.to_string()],
        "the Containerfile must EXPOSE its PORT"
    );

    for (name, objects) in renderings() {
        let container = exactly_container(&objects);
        let ports = container["ports"]
            .as_array()
            .expect("the container declares its port");
        assert_eq!(ports.len(), 1, "{name}: Knative allows one container port");
        let container_port = number(&ports[0]["containerPort"], "containerPort");
        assert_eq!(
            container_port,
            u64::from(image_port),
            "{name}: containerPort differs from the image's PORT"
        );
        // Knative sets PORT to containerPort and refuses a Service setting it.
        for variable in container["env"].as_array().into_iter().flatten() {
            let variable_name = variable["name"].as_str().unwrap_or_default();
            assert!(
                !KNATIVE_RESERVED_ENV.contains(&variable_name),
                "{name}: {variable_name} is reserved by Knative"
            );
        }
    }
}

#[tokio::test]
async fn probe_paths_answer_200_on_the_real_binary() {
    let mut paths = BTreeSet::new();
    for (name, objects) in renderings() {
        let container = exactly_container(&objects);
        let container_port = number(&container["ports"][0]["containerPort"], "containerPort");
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let get = &container[probe]["httpGet"];
            if container[probe].is_null() && probe == "startupProbe" {
                continue;
            }
            let path = get["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {probe} has no httpGet.path"));
            if !get["port"].is_null() {
                assert_eq!(
                    number(&get["port"], "probe port"),
                    container_port,
                    "{name}: {probe} probes another port than the container's"
                );
            }
            paths.insert(path.to_owned());
        }
    }
    assert!(
        paths.contains("/healthz") && paths.contains("/readyz"),
        "{paths:?}"
    );

    let app = TestApp::spawn(Backend::Sqlite).await;
    for path in &paths {
        let answer = app.get(path).await;
        assert_eq!(
            answer.status, 200,
            "GET {path} on a ready exactly:\n{answer}"
        );
    }
}

/// The Triggers' dead-letter path is one the binary serves: a 404 there
/// would make the dispatcher retry each dead letter and then drop it. An
/// empty body is not a CloudEvent, yet the served path stores it as
/// received and answers 202 (a 404 or 405 means not served).
#[tokio::test]
async fn the_dead_letter_path_is_served_by_the_real_binary() {
    assert_eq!(DEAD_LETTER_PATH, exactly::dlq::PATH);
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.post_to(DEAD_LETTER_PATH, &[], Vec::new())
        .await
        .assert_accepted();
}

#[test]
fn every_environment_variable_is_one_the_binary_reads() {
    let read = env_names_in_help(&serve_help());
    for expected in [
        "DATABASE_URL",
        "PORT",
        "EXACTLY_HANDLERS",
        "EXACTLY_LOG_FORMAT",
    ] {
        assert!(
            read.contains(expected),
            "the help lists {read:?}, not {expected}"
        );
    }

    let mut set = BTreeSet::new();
    for (name, objects) in renderings() {
        for variable in exactly_container(&objects)["env"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let variable = variable["name"].as_str().expect("an env entry has a name");
            set.insert((name.clone(), variable.to_owned()));
        }
    }
    for variable in Containerfile::load().env.keys() {
        set.insert(("Containerfile".to_owned(), variable.clone()));
    }
    for (source, variable) in &set {
        assert!(
            read.contains(variable),
            "{source} sets {variable}, which exactly does not read (it reads {read:?})"
        );
    }
}

#[test]
fn credentials_come_from_the_secret_cloudnativepg_generates() {
    for (name, objects) in renderings() {
        let container = exactly_container(&objects);
        let database_url = container["env"]
            .as_array()
            .and_then(|env| {
                env.iter()
                    .find(|variable| variable["name"] == "DATABASE_URL")
            })
            .unwrap_or_else(|| panic!("{name}: the Service does not set DATABASE_URL"));
        assert!(
            database_url["value"].is_null(),
            "{name}: DATABASE_URL must come from a Secret, not a literal"
        );
        let reference = &database_url["valueFrom"]["secretKeyRef"];
        let clusters = of_kind(&objects, "Cluster");
        assert_eq!(clusters.len(), 1, "{name}: one CloudNativePG Cluster");
        let cluster = clusters[0];
        assert_eq!(cluster["apiVersion"], "postgresql.cnpg.io/v1");
        // CloudNativePG names the application owner's Secret <cluster>-app;
        // its `uri` key is a postgresql:// URL exactly accepts.
        let cluster_name = cluster["metadata"]["name"].as_str().expect("a name");
        assert_eq!(reference["name"], format!("{cluster_name}-app"), "{name}");
        assert_eq!(reference["key"], "uri", "{name}");
        // The owner creates one role per handler at migration.
        let owner = cluster["spec"]["bootstrap"]["initdb"]["owner"]
            .as_str()
            .expect("initdb names the owner");
        let post_init = cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"]
            .as_array()
            .expect("postInitApplicationSQL grants CREATEROLE");
        assert!(
            post_init
                .iter()
                .any(|sql| sql == &Value::String(format!("ALTER ROLE {owner} CREATEROLE"))),
            "{name}: the owner {owner} lacks CREATEROLE"
        );
    }
}

#[test]
fn triggers_route_exactly_the_types_of_the_image_manifest() {
    let types = ImageManifest::image().types();
    for (name, objects) in renderings() {
        let triggers = of_kind(&objects, "Trigger");
        let mut routed = Vec::new();
        for trigger in &triggers {
            let key = format!("{name}: {}", object_key(trigger));
            assert_eq!(trigger["apiVersion"], "eventing.knative.dev/v1", "{key}");
            let attributes = trigger["spec"]["filter"]["attributes"]
                .as_object()
                .unwrap_or_else(|| panic!("{key} filters on no attribute"));
            assert_eq!(
                attributes.keys().collect::<Vec<_>>(),
                ["type"],
                "{key} must filter on the type alone"
            );
            routed.push(attributes["type"].as_str().expect("a type").to_owned());

            let broker = trigger["spec"]["broker"].as_str().expect("a broker");
            let broker = find(&objects, "Broker", broker);
            assert_eq!(
                broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"], "Kafka",
                "{key}: the broker is not of the Kafka class"
            );

            let subscriber = &trigger["spec"]["subscriber"];
            assert_eq!(subscriber["ref"]["kind"], "Service", "{key}");
            assert_eq!(
                subscriber["ref"]["apiVersion"], "serving.knative.dev/v1",
                "{key}"
            );
            assert_eq!(subscriber["ref"]["name"], "exactly", "{key}");
            assert!(
                subscriber["uri"].is_null() || subscriber["uri"] == "/",
                "{key}: exactly takes events on /"
            );

            let delivery = &trigger["spec"]["delivery"];
            assert!(
                number(&delivery["retry"], "retry") >= 3,
                "{key}: too few retries"
            );
            assert_eq!(delivery["backoffPolicy"], "exponential", "{key}");
            assert!(
                delivery["backoffDelay"]
                    .as_str()
                    .is_some_and(|delay| delay.starts_with("PT")),
                "{key}: backoffDelay must be an ISO-8601 duration"
            );
            let sink = &delivery["deadLetterSink"];
            assert_eq!(sink["ref"]["kind"], "Service", "{key}");
            assert_eq!(sink["ref"]["apiVersion"], "serving.knative.dev/v1", "{key}");
            assert_eq!(sink["ref"]["name"], "exactly", "{key}");
            assert_eq!(sink["uri"], DEAD_LETTER_PATH, "{key}: the dead-letter path");

            let order =
                &trigger["metadata"]["annotations"]["kafka.eventing.knative.dev/delivery.order"];
            assert!(
                order == "ordered" || order == "unordered",
                "{key}: delivery.order is {order}"
            );
            // Payments after creation: see the comment in triggers.yaml.
            if attributes["type"] == "order.payment" {
                assert_eq!(order, "ordered", "{key}: payments are delivered in order");
            }
        }
        routed.sort();
        let unique: BTreeSet<&String> = routed.iter().collect();
        assert_eq!(
            unique.len(),
            routed.len(),
            "{name}: two Triggers for one type: {routed:?}"
        );
        assert_eq!(
            routed, types,
            "{name}: the Triggers' types and deploy/handlers.toml differ"
        );
    }
}

#[test]
fn the_image_manifest_is_the_repository_manifest_in_the_image_layout() {
    let image = ImageManifest::image();
    let repository = ImageManifest::load(&repo_root().join("handlers.toml"));
    let summary = |manifest: &ImageManifest| {
        manifest
            .handlers
            .iter()
            .map(|handler| {
                let component = Path::new(&handler.component)
                    .file_name()
                    .expect("a component file")
                    .to_string_lossy()
                    .into_owned();
                (
                    handler.name.clone(),
                    handler.types.clone(),
                    handler.uses.clone(),
                    component,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(summary(&image), summary(&repository));
    for (in_image, in_repository) in image.handlers.iter().zip(&repository.handlers) {
        assert!(
            in_image.component.starts_with('/'),
            "{in_image:?}: image paths are absolute"
        );
        let migrations = in_image
            .migrations
            .as_deref()
            .expect("the image ships migrations");
        assert!(migrations.starts_with('/'), "{in_image:?}");
        let source = repo_root().join(
            in_repository
                .migrations
                .as_deref()
                .expect("the repository's handler has migrations"),
        );
        for backend in ["postgres", "sqlite"] {
            assert!(
                source.join(backend).is_dir(),
                "{} has no {backend}/",
                source.display()
            );
        }
    }
}

#[test]
fn the_containerfile_copies_every_path_the_image_manifest_names() {
    let file = Containerfile::load();
    let manifest = ImageManifest::image();
    assert_eq!(file.from, ["scratch"], "no base image can be pulled here");

    let handlers_path = file
        .env
        .get("EXACTLY_HANDLERS")
        .expect("the image names its handler manifest");
    let copy = file
        .copy_providing(handlers_path)
        .unwrap_or_else(|| panic!("nothing copies {handlers_path}"));
    assert_eq!(copy.source, "handlers.toml", "{copy:?}");
    for handler in &manifest.handlers {
        let component = file
            .copy_providing(&handler.component)
            .unwrap_or_else(|| panic!("nothing copies {}", handler.component));
        // deploy/build-image stages dist/<name>.wasm as handlers/<name>.wasm.
        assert_eq!(component.source, format!("handlers/{}.wasm", handler.name));
        let migrations = handler.migrations.as_deref().expect("migrations");
        let copy = file
            .copy_providing(migrations)
            .unwrap_or_else(|| panic!("nothing copies {migrations}"));
        assert_eq!(copy.source, format!("migrations/{}", handler.name));
    }
    let binary = file.entrypoint.first().expect("an ENTRYPOINT");
    assert!(
        file.copy_providing(binary).is_some(),
        "nothing copies {binary}"
    );
    assert_eq!(file.cmd, ["serve"]);

    // Non-root, numeric (scratch has no /etc/passwd), and the same user the
    // Knative Service asks for.
    let user = file.user.as_deref().expect("a USER");
    let uid: u64 = user
        .split(':')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("a numeric USER");
    assert_ne!(uid, 0, "the image must not run as root");
    for (name, objects) in renderings() {
        let security = &exactly_container(&objects)["securityContext"];
        assert_eq!(number(&security["runAsUser"], "runAsUser"), uid, "{name}");
        assert_eq!(security["runAsNonRoot"], true, "{name}");
    }

    // The SQLite default lives in a folder that user owns.
    let database_url = file
        .env
        .get("DATABASE_URL")
        .expect("a default DATABASE_URL");
    let database = database_url
        .strip_prefix("sqlite://")
        .expect("the image defaults to SQLite");
    let data = file
        .copy_providing(database)
        .unwrap_or_else(|| panic!("nothing creates the folder of {database}"));
    assert_eq!(
        data.owner.as_deref(),
        Some(user),
        "{data:?} must belong to {user}"
    );
    let workdir = file.workdir.as_deref().expect("a WORKDIR");
    assert_eq!(
        file.copy_providing(workdir)
            .and_then(|copy| copy.owner.as_deref()),
        Some(user)
    );
}

#[test]
fn kafka_runs_in_kraft_mode_on_strimzi_v1() {
    for (name, objects) in renderings() {
        let kafkas = of_kind(&objects, "Kafka");
        assert_eq!(kafkas.len(), 1, "{name}");
        let kafka = kafkas[0];
        let kafka_name = kafka["metadata"]["name"].as_str().expect("a name");
        for kind in ["Kafka", "KafkaNodePool", "KafkaTopic"] {
            for object in of_kind(&objects, kind) {
                assert_eq!(
                    object["apiVersion"],
                    "kafka.strimzi.io/v1",
                    "{name}: {}",
                    object_key(object)
                );
                if kind != "Kafka" {
                    assert_eq!(
                        object["metadata"]["labels"]["strimzi.io/cluster"],
                        kafka_name,
                        "{name}: {} belongs to another cluster",
                        object_key(object)
                    );
                }
            }
        }
        let annotations = &kafka["metadata"]["annotations"];
        assert_eq!(annotations["strimzi.io/kraft"], "enabled", "{name}");
        assert_eq!(annotations["strimzi.io/node-pools"], "enabled", "{name}");
        assert!(
            kafka["spec"]["zookeeper"].is_null(),
            "{name}: no ZooKeeper in KRaft mode"
        );

        let pools = of_kind(&objects, "KafkaNodePool");
        let roles: BTreeSet<&str> = pools
            .iter()
            .flat_map(|pool| pool["spec"]["roles"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(roles, BTreeSet::from(["broker", "controller"]), "{name}");

        // The broker stores its events in the declared topic.
        let broker = find(&objects, "Broker", "orders");
        let topic_name =
            broker["metadata"]["annotations"]["kafka.eventing.knative.dev/external.topic"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: the broker names no external topic"));
        let topic = of_kind(&objects, "KafkaTopic")
            .into_iter()
            .find(|topic| {
                topic["spec"]["topicName"]
                    .as_str()
                    .unwrap_or(topic["metadata"]["name"].as_str().unwrap_or_default())
                    == topic_name
            })
            .unwrap_or_else(|| panic!("{name}: no KafkaTopic {topic_name}"));

        // The broker's config points at the cluster's bootstrap Service.
        let config_reference = &broker["spec"]["config"];
        assert_eq!(config_reference["kind"], "ConfigMap", "{name}");
        let config = find(
            &objects,
            "ConfigMap",
            config_reference["name"].as_str().expect("a name"),
        );
        assert_eq!(
            config_reference["namespace"], config["metadata"]["namespace"],
            "{name}: the broker's config is in another namespace"
        );
        let listener = kafka["spec"]["kafka"]["listeners"]
            .as_array()
            .and_then(|listeners| listeners.iter().find(|listener| listener["tls"] == false))
            .expect("a plain listener");
        let namespace = kafka["metadata"]["namespace"]
            .as_str()
            .expect("a namespace");
        assert_eq!(
            config["data"]["bootstrap.servers"],
            format!(
                "{kafka_name}-kafka-bootstrap.{namespace}.svc:{}",
                number(&listener["port"], "listener port")
            ),
            "{name}"
        );
        assert_eq!(
            number(
                &config["data"]["default.topic.replication.factor"],
                "replication factor"
            ),
            number(&topic["spec"]["replicas"], "topic replicas"),
            "{name}: the broker config and the topic disagree on replication"
        );
        assert_eq!(
            number(&config["data"]["default.topic.partitions"], "partitions"),
            number(&topic["spec"]["partitions"], "topic partitions"),
            "{name}: the broker config and the topic disagree on partitions"
        );

        let brokers: u64 = pools
            .iter()
            .filter(|pool| {
                pool["spec"]["roles"]
                    .as_array()
                    .is_some_and(|roles| roles.contains(&"broker".into()))
            })
            .map(|pool| number(&pool["spec"]["replicas"], "pool replicas"))
            .sum();
        let replicas = number(&topic["spec"]["replicas"], "topic replicas");
        let min_insync = number(
            &topic["spec"]["config"]["min.insync.replicas"],
            "min.insync.replicas",
        );
        assert!(
            replicas <= brokers,
            "{name}: {replicas} replicas on {brokers} brokers"
        );
        assert!(
            min_insync <= replicas && (replicas == 1 || min_insync < replicas),
            "{name}: min.insync.replicas {min_insync} with {replicas} replicas stops producing when one node is down"
        );
        let config = &kafka["spec"]["kafka"]["config"];
        assert!(
            number(&config["offsets.topic.replication.factor"], "offsets RF") <= brokers,
            "{name}"
        );
    }
}

/// dev: one node, nothing replicated. production: replication factor 3,
/// min.insync.replicas 2, three PostgreSQL instances.
#[test]
fn overlays_replicate_as_documented() {
    for (overlay_name, nodes, replication, min_insync, postgres) in
        [("dev", 1, 1, 1, 1), ("production", 3, 3, 2, 3)]
    {
        let objects = overlay(overlay_name);
        let pool = find(&objects, "KafkaNodePool", "dual-role");
        assert_eq!(
            number(&pool["spec"]["replicas"], "nodes"),
            nodes,
            "{overlay_name}"
        );
        let kafka = &find(&objects, "Kafka", "exactly-kafka")["spec"]["kafka"]["config"];
        for (key, expected) in [
            ("default.replication.factor", replication),
            ("offsets.topic.replication.factor", replication),
            ("transaction.state.log.replication.factor", replication),
            ("min.insync.replicas", min_insync),
            ("transaction.state.log.min.isr", min_insync),
        ] {
            assert_eq!(
                number(&kafka[key], key),
                expected,
                "{overlay_name}: Kafka {key}"
            );
        }
        let topic = &find(&objects, "KafkaTopic", "exactly-orders")["spec"];
        assert_eq!(
            number(&topic["replicas"], "topic replicas"),
            replication,
            "{overlay_name}"
        );
        assert_eq!(
            number(
                &topic["config"]["min.insync.replicas"],
                "topic min.insync.replicas"
            ),
            min_insync,
            "{overlay_name}"
        );
        let cluster = find(&objects, "Cluster", "exactly-db");
        assert_eq!(
            number(&cluster["spec"]["instances"], "instances"),
            postgres,
            "{overlay_name}"
        );
    }
}

#[test]
fn the_service_sizes_agree_with_each_other() {
    for (name, objects) in renderings() {
        let service = exactly_service(&objects);
        let spec = &service["spec"]["template"]["spec"];
        let container = exactly_container(&objects);
        let connections = number(
            &Value::from(env_value(container, "EXACTLY_DB_MAX_CONNECTIONS").expect("pool size")),
            "EXACTLY_DB_MAX_CONNECTIONS",
        );
        // Each event in flight holds a connection: more concurrency than
        // connections only queues inside the pod.
        assert_eq!(
            number(&spec["containerConcurrency"], "containerConcurrency"),
            connections,
            "{name}"
        );
        let timeout_ms = number(&spec["timeoutSeconds"], "timeoutSeconds") * 1000;
        let handler =
            duration_ms(env_value(container, "EXACTLY_HANDLER_TIMEOUT").expect("deadline"));
        let lock = duration_ms(env_value(container, "EXACTLY_LOCK_TIMEOUT").expect("lock timeout"));
        let grace = duration_ms(env_value(container, "EXACTLY_SHUTDOWN_GRACE").expect("grace"));
        assert!(
            handler + lock < timeout_ms,
            "{name}: timeoutSeconds cuts events short"
        );
        assert!(
            grace < timeout_ms,
            "{name}: the shutdown grace outlasts Knative's"
        );

        let resources = &container["resources"];
        assert!(
            resources["requests"]["cpu"].is_string(),
            "{name}: no CPU request"
        );
        assert!(
            resources["requests"]["memory"].is_string(),
            "{name}: no memory request"
        );
        let limit = quantity_mib(
            resources["limits"]["memory"]
                .as_str()
                .expect("a memory limit"),
        );
        let per_handler: u64 = env_value(container, "EXACTLY_HANDLER_MEMORY_MIB")
            .expect("a handler memory cap")
            .parse()
            .expect("MiB");
        assert!(
            per_handler * connections < limit,
            "{name}: {connections} handlers x {per_handler} MiB do not fit in {limit} MiB"
        );

        // Every pod at full scale holds a full pool per handler (each
        // handler's events log in as its own role) and one for its own
        // work, with room to spare for the operator, replication and an
        // administrator.
        let handlers = std::fs::read_to_string(repo_root().join("deploy/handlers.toml"))
            .expect("deploy/handlers.toml")
            .matches("[[handler]]")
            .count() as u64;
        let max_scale = number(
            &service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"],
            "max-scale",
        );
        let cluster = find(&objects, "Cluster", "exactly-db");
        let max_connections = number(
            &cluster["spec"]["postgresql"]["parameters"]["max_connections"],
            "max_connections",
        );
        assert!(
            max_scale * (handlers + 1) * connections + 10 <= max_connections,
            "{name}: {max_scale} pods x ({handlers} handlers + 1) x {connections} connections exceed max_connections {max_connections}"
        );
    }
}

/// The image's handlers are precompiled (deploy/build-image) for the engine
/// settings in the Containerfile's ENV; the Service must run with the same
/// ones, or every pod would compile its handlers at start-up again.
#[test]
fn the_service_runs_with_the_engine_settings_the_image_was_precompiled_for() {
    let image = Containerfile::load();
    for name in ["EXACTLY_HANDLER_MEMORY_MIB", "EXACTLY_DB_MAX_CONNECTIONS"] {
        let baked = image
            .env
            .get(name)
            .unwrap_or_else(|| panic!("deploy/Containerfile sets no {name}"));
        for (rendering, objects) in renderings() {
            let container = exactly_container(&objects);
            let value = env_value(container, name).unwrap_or(baked);
            assert_eq!(
                value, baked,
                "{rendering}: {name} differs from the Containerfile's, so the precompiled handlers would not load"
            );
        }
    }
}
