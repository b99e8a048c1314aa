//! The Kubernetes manifests and SealedSecrets a project names (`[k3s] manifests`,
//! `[sealed_secrets] secrets`): checked before anything is built.

use super::error::{RecipeError, Result};
use serde::Deserialize;
use std::path::Path;

/// Checks a manifest file: every YAML document has apiVersion, kind and metadata.name.
pub fn validate_manifest(path: &Path, text: &str) -> Result<usize> {
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
    let n = validate_manifest(path, text)?;
    for doc in serde_yaml::Deserializer::from_str(text) {
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
    }
    Ok(n)
}
