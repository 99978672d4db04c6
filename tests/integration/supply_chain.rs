//! Cargo.lock against supply-chain/floors.toml: no dependency below its
//! advisory floor, no banned crate (see the file for why it is kept by hand).

use std::{fs, path::Path};

/// A crate version as `(major, minor, patch)`; pre-release and build
/// metadata are ignored, which errs towards the older, stricter reading.
fn version(text: &str) -> (u64, u64, u64) {
    let core = text.split(['-', '+']).next().unwrap_or(text);
    let mut parts = core.split('.').map(|part| part.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Every violation of `floors` by the packages in `lock`, one line each.
fn violations(lock: &toml::Table, floors: &toml::Table) -> Vec<String> {
    let packages: Vec<(&str, &str)> = lock["package"]
        .as_array()
        .expect("Cargo.lock has [[package]]")
        .iter()
        .map(|package| {
            (
                package["name"].as_str().expect("package name"),
                package["version"].as_str().expect("package version"),
            )
        })
        .collect();
    let mut found = Vec::new();
    for floor in floors["floor"].as_array().expect("[[floor]] entries") {
        let name = floor["crate"].as_str().expect("floor crate");
        let min = floor["min"].as_str().expect("floor min");
        let advisory = floor["advisory"].as_str().expect("floor advisory");
        for (_, present) in packages.iter().filter(|(package, _)| *package == name) {
            if version(present) < version(min) {
                found.push(format!(
                    "{name} {present} is below its floor {min} ({advisory}): run `cargo update -p {name}`"
                ));
            }
        }
    }
    for banned in floors["banned"].as_array().expect("[[banned]] entries") {
        let name = banned["crate"].as_str().expect("banned crate");
        let advisory = banned["advisory"].as_str().expect("banned advisory");
        for (_, present) in packages.iter().filter(|(package, _)| *package == name) {
            found.push(format!(
                "{name} {present} is banned ({advisory}): remove the dependency that pulls it in (`cargo tree -i {name}`)"
            ));
        }
    }
    found
}

fn read_toml(path: &Path) -> toml::Table {
    let text =
        fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn cargo_lock_respects_the_advisory_floors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let floors = read_toml(&root.join("supply-chain/floors.toml"));
    assert!(
        floors["checked"]
            .as_str()
            .is_some_and(|date| date.len() == 10)
    );
    let problems = violations(&read_toml(&root.join("Cargo.lock")), &floors);
    assert!(
        problems.is_empty(),
        "supply-chain problems:\n{}",
        problems.join("\n")
    );
    // The floors the project has promised are really listed.
    let listed: Vec<&str> = floors["floor"]
        .as_array()
        .unwrap()
        .iter()
        .map(|floor| floor["crate"].as_str().unwrap())
        .collect();
    for required in ["h2", "tonic"] {
        assert!(listed.contains(&required), "no floor for {required}");
    }
}

#[test]
fn a_crate_below_its_floor_or_a_banned_crate_is_reported() {
    let lock: toml::Table = toml::from_str(
        r#"
        [[package]]
        name = "h2"
        version = "0.4.15"
        [[package]]
        name = "h2"
        version = "0.4.16"
        [[package]]
        name = "tonic"
        version = "0.12.3-beta.1"
        [[package]]
        name = "rsa"
        version = "0.9.8"
        "#,
    )
    .unwrap();
    let floors: toml::Table = toml::from_str(
        r#"
        [[floor]]
        crate = "h2"
        min = "0.4.16"
        advisory = "A-1"
        [[floor]]
        crate = "tonic"
        min = "0.12.3"
        advisory = "A-2"
        [[banned]]
        crate = "rsa"
        advisory = "A-3"
        "#,
    )
    .unwrap();
    let problems = violations(&lock, &floors);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains("h2 0.4.15 is below its floor 0.4.16 (A-1)"));
    assert!(problems[1].contains("rsa 0.9.8 is banned (A-3)"));
    assert_eq!(version("0.9.12+spec-1.1.0"), (0, 9, 12));
}
