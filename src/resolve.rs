//! Resolve stage: the build id = sha256 of the canonical JSON of every input that shapes a
//! role's artifacts — merged recipe, cluster inventory, base spec, overlay contents, kiln's
//! version. No absolute paths and no host state go in, so the same inputs give the same id on
//! any machine. Secrets never go in (later stages keep them out of the hashed recipe).

use crate::base::BaseSpec;
use crate::compose::{self, OverlayFile};
use crate::recipe::{self, Cluster, Project, Recipe};
use anyhow::Result;
use serde::Serialize;

/// Version of the build-id schema; bump when the meaning of the inputs changes.
pub const SCHEMA: &str = "kiln.build-id/1";

/// Everything that determines a role build.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub schema: &'static str,
    pub kiln_version: &'static str,
    pub role: String,
    pub recipe: Recipe,
    pub cluster: Cluster,
    pub base: BaseSpec,
    pub base_key: String,
    pub overlays: Vec<OverlayFile>,
    /// sha256 of `canonical_json()` — the build id.
    #[serde(skip)]
    pub build_id: String,
}

impl Resolved {
    /// Canonical JSON of the inputs (struct field order is fixed; maps are BTreeMaps).
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }
}

/// Loads the role's recipe and computes its build id.
pub fn resolve(project: &Project, role: &str) -> Result<Resolved> {
    let recipe = recipe::load_role(project, role)?;
    let overlays = compose::scan_overlays(project, role)?;
    compose::check_templates(project, &overlays)?;
    let base = BaseSpec::new(&recipe, project.cluster.section.source_date_epoch);
    let mut r = Resolved {
        schema: SCHEMA,
        kiln_version: env!("CARGO_PKG_VERSION"),
        role: role.to_string(),
        base_key: base.key(),
        recipe,
        cluster: project.cluster.clone(),
        base,
        overlays,
        build_id: String::new(),
    };
    r.build_id = crate::util::sha256_hex(r.canonical_json().as_bytes());
    Ok(r)
}
