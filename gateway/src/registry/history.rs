//! Reading what happened: the audit log and its verification, which
//! versions served at a time, lineage, and the controller's status reports.
use super::*;

impl Registry {
    /// Appended entries, oldest first; `model` filters, `after` pages.
    pub fn audit(&self, model: Option<&str>, after: i64, limit: i64) -> Result<Vec<AuditEntry>> {
        let sql = format!(
            "SELECT {} FROM audit WHERE seq > $1 AND ($2 = '' OR model = $2) ORDER BY seq LIMIT $3",
            AuditEntry::COLUMNS
        );
        let rows = self.lock().query(
            &sql,
            &[
                Sql::Int(after),
                Sql::Text(model.unwrap_or_default().into()),
                Sql::Int(limit),
            ],
        )?;
        rows.iter()
            .map(|r| {
                AuditEntry::from_row(r).ok_or_else(|| {
                    RegistryError::Storage(StoreError("an audit row has missing columns".into()))
                })
            })
            .collect()
    }

    /// Every entry (of `model`, or all), oldest first, read in pages.
    fn all_entries(&self, model: Option<&str>) -> Result<Vec<AuditEntry>> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |e: &AuditEntry| e.seq);
            let page = self.audit(model, after, 10_000)?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Recomputes the whole chain.
    /// Recomputes the audit chain; the outcome is also exported
    /// (`switchyard:registry_audit_verified`, `..._audit_entries`).
    pub fn verify(&self) -> Result<Verification> {
        let v = audit::verify(self.all_entries(None)?);
        metrics::gauge!("switchyard:registry_audit_verified").set(f64::from(u8::from(v.ok)));
        metrics::gauge!("switchyard:registry_audit_entries").set(v.entries as f64);
        Ok(v)
    }

    /// Which versions served `model` at `at_ms`, replayed from the audit log.
    pub fn served_at(&self, model: &str, at_ms: i64) -> Result<Served> {
        self.model(model)?;
        let mut states: BTreeMap<u32, (State, Option<f64>)> = BTreeMap::new();
        for e in self.all_entries(Some(model))? {
            if e.at_ms > at_ms {
                break;
            }
            let body = e.body_json();
            let (Some(v), Some(s)) = (e.version, body["after"].get("state")) else {
                continue;
            };
            if let Ok(s) = serde_json::from_value::<State>(s.clone()) {
                let pct = body["after"]["traffic_percent"].as_f64();
                states.insert(v as u32, (s, pct));
            }
        }
        Ok(Served {
            model: model.into(),
            at_ms,
            primary: states
                .iter()
                .find(|(_, (s, _))| *s == State::Promoted)
                .map(|(v, _)| *v),
            candidates: states
                .iter()
                .filter(|(_, (s, _))| s.is_live() && *s != State::Promoted)
                .map(|(v, (s, p))| ServedCandidate {
                    version: *v,
                    state: *s,
                    traffic_percent: *p,
                })
                .collect(),
        })
    }

    /// The version's ancestors (through `parent_version`) and its transitive dependents.
    pub fn lineage(&self, model: &str, number: u32) -> Result<Value> {
        let vs = self.versions(model)?;
        let v = vs.iter().find(|v| v.number == number).ok_or_else(|| {
            RegistryError::NotFound(format!("model `{model}` has no version {number}"))
        })?;
        let mut ancestors = Vec::new();
        let mut parent = v.spec.lineage.parent_version;
        while let Some(p) = parent.filter(|p| !ancestors.contains(p)) {
            ancestors.push(p);
            parent = vs
                .iter()
                .find(|x| x.number == p)
                .and_then(|x| x.spec.lineage.parent_version);
        }
        let mut dependents = Vec::new();
        let mut queue = v.spec.dependents.clone();
        while let Some(d) = queue.pop() {
            if dependents.contains(&d) {
                continue;
            }
            if let Ok((m, n)) = parse_ref(&d) {
                if let Ok(dv) = self.version(&m, n) {
                    queue.extend(dv.spec.dependents.clone());
                }
            }
            dependents.push(d);
        }
        Ok(json!({
            "model": model,
            "version": number,
            "lineage": v.spec.lineage,
            "ancestors": ancestors,
            "dependents": dependents,
        }))
    }

    pub fn status(&self, model: &str, number: u32) -> Result<Option<Status>> {
        let rows = self.lock().query(
            "SELECT doc FROM version_status WHERE model = $1 AND number = $2",
            &[Sql::Text(model.into()), Sql::Int(number.into())],
        )?;
        rows.first()
            .map(|r| decode(r[0].text().unwrap_or_default()))
            .transpose()
    }

    /// The controller's report; written only when it changes. Observed state
    /// is not a registry change, so it is not audited.
    pub fn set_status(&self, model: &str, number: u32, phase: Phase, message: &str) -> Result<()> {
        if let Some(s) = self.status(model, number)? {
            if s.phase == phase && s.message == message {
                return Ok(());
            }
        }
        let doc = Status {
            phase,
            message: message.into(),
            at_ms: now_ms(),
        };
        self.lock().exec(
            "INSERT INTO version_status (model, number, doc) VALUES ($1, $2, $3)
             ON CONFLICT (model, number) DO UPDATE SET doc = excluded.doc",
            &[
                Sql::Text(model.into()),
                Sql::Int(number.into()),
                Sql::Text(serde_json::to_string(&doc).expect("status serializes")),
            ],
        )?;
        Ok(())
    }
}
