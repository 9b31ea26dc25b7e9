//! The deployment files against the binary they deploy: every command in
//! docker-compose.yml and the Dockerfile parses as quotebridge's command
//! line, every environment passes `config check`, and every file a command
//! names is one the image holds. (script/check-docker-context, run by CI,
//! checks that the image's build context builds.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use quotebridge::cli::Cli;
use yaml_rust2::{Yaml, YamlLoader};

use crate::binary::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where the Dockerfile puts `data/` in the image.
const IMAGE_DATA: &str = "/usr/share/quotebridge/data/";

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The `ENV` settings of the Dockerfile's final image.
fn image_env() -> BTreeMap<String, String> {
    read("Dockerfile")
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Checks that `command` (without the program name) parses, that the files
/// it names are in the image, and that `env` with its `--role`/`--shard`
/// passes `config check`. `what` names it in failures.
fn check_command(what: &str, command: &[String], env: &BTreeMap<String, String>) {
    let argv = std::iter::once("quotebridge").chain(command.iter().map(String::as_str));
    if let Err(err) = Cli::try_parse_from(argv) {
        panic!(
            "{what}: `quotebridge {}` does not parse:\n{err}",
            command.join(" ")
        );
    }
    for arg in command {
        if let Some(file) = arg.strip_prefix(IMAGE_DATA) {
            assert!(
                Path::new(ROOT).join("data").join(file).is_file(),
                "{what}: {arg} is not in data/, which the image copies there"
            );
        }
    }
    let mut env = env.clone();
    for (flag, key) in [("--role", "NODE__ROLE"), ("--shard", "NODE__SHARD")] {
        if let Some(at) = command.iter().position(|arg| arg == flag) {
            env.insert(format!("QUOTEBRIDGE__{key}"), command[at + 1].clone());
        }
    }
    let out = Command::new(BIN)
        .args(["config", "check"])
        .envs(&env)
        .output()
        .expect("run quotebridge config check");
    assert!(
        out.status.success(),
        "{what}: its environment fails config check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn string(value: &Yaml) -> String {
    match value {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(n) => n.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

#[test]
fn every_compose_service_of_ours_runs_a_command_and_environment_the_binary_accepts() {
    let compose = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    let services = compose[0]["services"].as_hash().expect("services");
    let mut checked = Vec::new();
    for (name, service) in services {
        let name = string(name);
        let ours = service["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("quotebridge"));
        if !ours {
            continue;
        }
        let command: Vec<String> = service["command"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name}: command must be a list"))
            .iter()
            .map(string)
            .collect();
        let mut env = image_env();
        if let Some(vars) = service["environment"].as_hash() {
            for (key, value) in vars {
                env.insert(string(key), string(value));
            }
        }
        check_command(&format!("compose service {name}"), &command, &env);
        checked.push(name);
    }
    assert!(
        checked.len() >= 7,
        "the bridge, its feeder and the scale profile's five: {checked:?}"
    );
}

#[test]
fn the_images_commands_are_ones_the_binary_accepts() {
    let dockerfile = read("Dockerfile");
    let mut commands = Vec::new();
    for line in dockerfile.lines() {
        // `CMD [...]` and the HEALTHCHECK's `  CMD [...]`, in exec form.
        let Some(list) = line.trim().strip_prefix("CMD ") else {
            continue;
        };
        let mut command: Vec<String> =
            serde_json::from_str(list).unwrap_or_else(|e| panic!("{line}: {e}"));
        if command.first().map(String::as_str) == Some("quotebridge") {
            command.remove(0);
        }
        commands.push(command);
    }
    assert_eq!(
        commands.len(),
        2,
        "the health check and the default command"
    );
    for command in commands {
        check_command("the Dockerfile", &command, &image_env());
    }
}
