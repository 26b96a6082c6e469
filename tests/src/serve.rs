//! `exactly serve` started by a test itself, with a database URL and flags
//! of its own (a database behind a proxy, a TLS server, a signal to send),
//! where [`crate::TestApp`] would start it on the shared test database.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::app::exactly_binary;
use crate::{Answer, Event, TestEnv};

/// `exactly serve` started by the test, with its own flags.
pub struct Host {
    pub child: Child,
    pub address: String,
    client: reqwest::Client,
    stderr: PathBuf,
}

impl Host {
    pub async fn start(env: &TestEnv, database_url: &str, flags: &[&str]) -> Host {
        let stderr = env.dir().join(format!(
            "exactly-{}.stderr.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = Command::new(exactly_binary())
            .env_remove("DATABASE_URL")
            .env_remove("PORT")
            .current_dir(env.dir())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--database-url", database_url])
            .arg("--handlers")
            .arg(env.manifest())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(&stderr).expect("create the log"),
            ))
            .kill_on_drop(true)
            .spawn()
            .expect("start exactly serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let address = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.trim().strip_prefix("exactly listening on ") {
                    return address.trim_end_matches('/').to_owned();
                }
            }
            panic!(
                "exactly serve stopped before listening:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        })
        .await
        .expect("exactly serve listens within a minute");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        Host {
            child,
            address,
            client,
            stderr,
        }
    }

    pub async fn send(&self, event: &Event) -> Answer {
        self.try_send(event)
            .await
            .unwrap_or_else(|error| panic!("POST: {error}\n{}", self.log()))
    }

    pub async fn try_send(&self, event: &Event) -> Result<Answer, reqwest::Error> {
        let mut request = self.client.post(format!("{}/", self.address));
        for (name, value) in event.binary_headers() {
            request = request.header(name, value);
        }
        let response = request.body(event.data_bytes()).send().await?;
        Ok(Answer::read(response).await)
    }

    pub async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("GET");
        Answer::read(response).await
    }

    pub fn host_port(&self) -> String {
        self.address.trim_start_matches("http://").to_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}
