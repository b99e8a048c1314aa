//! The Kubernetes manifests and SealedSecrets a project names (`[k3s] manifests`,
//! `[sealed_secrets] secrets`): checked before anything is built.

use super::error::{RecipeError, Result};
use super::limits::{check_yaml, YamlInput, MANIFEST, SEALED_SECRET};
use super::names::{k8s_any_name_problem, k8s_label_problem, k8s_subdomain_problem};
use serde::Deserialize;
use std::path::Path;

/// Refuses `text` before parsing when it is larger or deeper than kiln reads.
fn check_limits(path: &Path, key: &str, text: &str, input: YamlInput) -> Result<()> {
    check_yaml(text, input).map_err(|e| {
        RecipeError::new(
            path,
            key,
            e.to_string(),
            "split the file, or flatten it (see docs/guide/recipes.md, \"Input limits\")",
        )
    })
}

/// `metadata.name` and `metadata.namespace` of document `doc` as Kubernetes takes them:
/// Secrets and SealedSecrets (`strict`) have DNS-1123 subdomain names, every kind a name
/// without `/`, a namespace is a DNS-1123 label.
fn check_names(path: &Path, doc: usize, v: &serde_yaml::Value, strict: bool) -> Result<()> {
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_default();
    let problem = if strict {
        k8s_subdomain_problem(name)
    } else {
        k8s_any_name_problem(name)
    };
    if let Some(p) = problem {
        return Err(RecipeError::new(
            path,
            format!("document {doc}: metadata.name"),
            format!("{name:?} {p}"),
            "use a Kubernetes name: lower-case letters, digits, '-' and '.', at most 253 characters (e.g. \"db-credentials\")",
        ));
    }
    match meta.and_then(|m| m.get("namespace")) {
        None | Some(serde_yaml::Value::Null) => Ok(()),
        Some(serde_yaml::Value::String(ns)) => match k8s_label_problem(ns) {
            None => Ok(()),
            Some(p) => Err(RecipeError::new(
                path,
                format!("document {doc}: metadata.namespace"),
                format!("{ns:?} {p}"),
                "use a namespace name: lower-case letters, digits and '-', at most 63 characters",
            )),
        },
        Some(_) => Err(RecipeError::new(
            path,
            format!("document {doc}: metadata.namespace"),
            "is not a string",
            "write the namespace as a string, e.g. namespace: default",
        )),
    }
}

/// Checks a manifest file: every YAML document has apiVersion, kind and metadata.name, names
/// Kubernetes takes.
pub fn validate_manifest(path: &Path, text: &str) -> Result<usize> {
    check_limits(path, "(manifest)", text, MANIFEST)?;
    let bad = |problem: String| {
        RecipeError::new(
            path,
            "(manifest)",
            problem,
            "every document needs apiVersion, kind and metadata.name (check with `kubectl apply --dry-run=client -f`)",
        )
    };
    let mut count = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| bad(format!("document {}: not valid YAML: {e}", i + 1)))?;
        if v.is_null() {
            continue; // empty document (e.g. a trailing ---)
        }
        let get = |k: &str| v.get(k);
        let s = |x: Option<&serde_yaml::Value>| {
            x.and_then(|x| x.as_str())
                .map(|x| !x.is_empty())
                .unwrap_or(false)
        };
        if !s(get("apiVersion")) {
            return Err(bad(format!("document {}: missing apiVersion", i + 1)));
        }
        if !s(get("kind")) {
            return Err(bad(format!("document {}: missing kind", i + 1)));
        }
        if !s(get("metadata").and_then(|m| m.get("name"))) {
            return Err(bad(format!("document {}: missing metadata.name", i + 1)));
        }
        check_names(path, i + 1, &v, false)?;
        if get("kind").and_then(|k| k.as_str()) == Some("Secret")
            && get("apiVersion").and_then(|a| a.as_str()) == Some("v1")
        {
            return Err(RecipeError::new(
                path,
                "(manifest)",
                format!("document {} is a plain Secret; plain secrets never go into images", i + 1),
                "seal it (`kiln seal secret.yaml -o recipes/secrets/x.yaml`) and list it in [sealed_secrets] secrets",
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err(bad("no Kubernetes objects in the file".into()));
    }
    Ok(count)
}

/// Checks a SealedSecret file: bitnami.com/v1alpha1 SealedSecrets with encryptedData only.
pub fn validate_sealed(path: &Path, text: &str) -> Result<usize> {
    check_limits(path, "(sealed secret)", text, SEALED_SECRET)?;
    let n = validate_manifest(path, text)?;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(doc).map_err(|e| {
            RecipeError::new(
                path,
                "(sealed secret)",
                e.to_string(),
                "regenerate it with `kiln seal`",
            )
        })?;
        if v.is_null() {
            continue;
        }
        let ok = v.get("apiVersion").and_then(|a| a.as_str()) == Some("bitnami.com/v1alpha1")
            && v.get("kind").and_then(|k| k.as_str()) == Some("SealedSecret")
            && v.get("spec")
                .and_then(|s| s.get("encryptedData"))
                .and_then(|d| d.as_mapping())
                .is_some_and(|m| !m.is_empty());
        if !ok {
            return Err(RecipeError::new(
                path,
                "(sealed secret)",
                "not a bitnami.com/v1alpha1 SealedSecret with spec.encryptedData",
                "make it with `kiln seal` (or kubeseal) from a plain Secret kept out of git",
            ));
        }
        // The controller's strict-scope label is "<namespace>/<name>": both must be the
        // names Kubernetes allows, or the label is ambiguous.
        check_names(path, i + 1, &v, true)?;
    }
    Ok(n)
}
