//! FHIR Bulk Data NDJSON, checked as it streams past: one resource per line.
//!
//! A line is valid when it is UTF-8, a JSON object (serde_json parses the whole line; fields other
//! than `resourceType` and `id` are skipped, not built), its `resourceType` is a resource type of
//! FHIR R4 or R5, and it has an `id`. Where the export's `manifest.json` lists the file, every
//! line's type must be the manifest's `type` for it and the number of resources its `count`.
//!
//! Memory is the longest line, bounded by `max_line`: complete lines are checked where they lie
//! in the chunk read, and only a line that spans two chunks is copied.
//!
//! Must not break: a reason never carries record content (no value read from a line is echoed
//! unless it is a resource type name), so a quarantine message is safe to log and to show.

use std::borrow::Cow;

use super::Invalid;

/// What the export's manifest says of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// The `type` of its `output[]` entry (every line must be this resource type).
    pub resource_type: Option<String>,
    /// Its `count`, when given (the number of resources in the file).
    pub count: Option<u64>,
}

/// The checker of one NDJSON file: `feed` the bytes in order, then `finish`.
pub struct NdjsonCheck {
    max_line: usize,
    expect: Expect,
    /// The start of a line that continues in the next chunk.
    partial: Vec<u8>,
    /// Lines seen (1-based number of the line being read is `line + 1`).
    line: u64,
    /// Byte offset of the start of the current line.
    line_start: u64,
    /// Resources (non-empty lines) seen.
    records: u64,
    failed: Option<Invalid>,
}

/// The two fields looked at; everything else in the object is parsed and skipped.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "resourceType", borrow, default)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

impl NdjsonCheck {
    /// A checker with lines of at most `max_line` bytes and what the manifest expects.
    pub fn new(max_line: usize, expect: Expect) -> NdjsonCheck {
        NdjsonCheck {
            max_line,
            expect,
            partial: Vec::new(),
            line: 0,
            line_start: 0,
            records: 0,
            failed: None,
        }
    }

    /// Whether a failure was found already (the rest need not be read).
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while self.failed.is_none() && !chunk.is_empty() {
            match memchr(b'\n', chunk) {
                Some(i) => {
                    let (line, rest) = (&chunk[..i], &chunk[i + 1..]);
                    if self.partial.is_empty() {
                        self.check_line(line);
                    } else if self.partial.len() + line.len() > self.max_line {
                        self.too_long();
                    } else {
                        let mut whole = std::mem::take(&mut self.partial);
                        whole.extend_from_slice(line);
                        self.check_line(&whole);
                        whole.clear();
                        self.partial = whole;
                    }
                    self.line += 1;
                    self.line_start += i as u64 + 1;
                    chunk = rest;
                }
                None => {
                    if self.partial.len() + chunk.len() > self.max_line {
                        self.too_long();
                    } else {
                        self.partial.extend_from_slice(chunk);
                    }
                    chunk = &[];
                }
            }
        }
    }

    /// The end of the file: the last line (a newline after it is optional) and the count.
    pub fn finish(mut self) -> Result<u64, Invalid> {
        if self.failed.is_none() && !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.check_line(&last);
            self.line += 1;
        }
        if let Some(f) = self.failed {
            return Err(f);
        }
        if let Some(count) = self.expect.count {
            if count != self.records {
                return Err(Invalid {
                    rule: "fhir-ndjson",
                    line: None,
                    offset: None,
                    reason: format!(
                        "{} resources where the manifest's count says {count}",
                        self.records
                    ),
                });
            }
        }
        Ok(self.records)
    }

    fn fail(&mut self, reason: String) {
        self.failed = Some(Invalid {
            rule: "fhir-ndjson",
            line: Some(self.line + 1),
            offset: Some(self.line_start),
            reason,
        });
    }

    fn too_long(&mut self) {
        let max = self.max_line;
        self.fail(format!("line longer than max_line ({max} bytes)"));
    }

    /// One line without its newline.
    fn check_line(&mut self, mut line: &[u8]) {
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.len() > self.max_line {
            return self.too_long();
        }
        let Some(first) = line.iter().position(|b| !b.is_ascii_whitespace()) else {
            return; // an empty line holds no resource
        };
        if let Err(e) = std::str::from_utf8(line) {
            return self.fail(format!(
                "not valid UTF-8 (at byte {} of the line)",
                e.valid_up_to()
            ));
        }
        // serde would also read a JSON array into the struct, by position: refuse it first.
        if line[first] != b'{' {
            return self.fail("not a JSON object (each line must be one FHIR resource)".into());
        }
        let head: Head<'_> = match serde_json::from_slice(line) {
            Ok(h) => h,
            // serde_json's message can quote the record ("invalid type: string \"...\""): only
            // its category and column are kept.
            Err(e) => {
                let what = match e.classify() {
                    serde_json::error::Category::Eof => "truncated JSON (the line ends early)",
                    serde_json::error::Category::Syntax => "not valid JSON",
                    _ => "resourceType or id is not a string",
                };
                return self.fail(format!("{what} (column {})", e.column()));
            }
        };
        let Some(rt) = head.resource_type else {
            return self.fail("no resourceType".into());
        };
        if !is_resource_type(&rt) {
            return self.fail("resourceType is not a FHIR R4/R5 resource type".into());
        }
        if head.id.as_deref().is_none_or(str::is_empty) {
            return self.fail(format!("{rt} without an id"));
        }
        if let Some(want) = &self.expect.resource_type {
            if *want != rt {
                return self.fail(format!(
                    "resourceType {rt} where the manifest lists this file as {want}"
                ));
            }
        }
        self.records += 1;
    }
}

/// The first `needle` in `hay` (the standard library's slice search, vectorised by the compiler).
fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|b| *b == needle)
}

/// Whether `name` is a resource type of FHIR R4 (4.0.1) or R5 (5.0.0).
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// The resource types of FHIR R4 and R5, sorted (abstract types such as DomainResource excluded).
const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "ActorDefinition",
    "AdministrableProductDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "ArtifactAssessment",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BiologicallyDerivedProductDispense",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Citation",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "ClinicalUseDefinition",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "ConditionDefinition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceDispense",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUsage",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "EncounterHistory",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceReport",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "FormularyItem",
    "GenomicStudy",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingSelection",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "Ingredient",
    "InsurancePlan",
    "InventoryItem",
    "InventoryReport",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "ManufacturedItemDefinition",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductDefinition",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionIntake",
    "NutritionOrder",
    "NutritionProduct",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "PackagedProductDefinition",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Permission",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RegulatedAuthorization",
    "RelatedPerson",
    "RequestGroup",
    "RequestOrchestration",
    "Requirements",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "SubscriptionStatus",
    "SubscriptionTopic",
    "Substance",
    "SubstanceDefinition",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestPlan",
    "TestReport",
    "TestScript",
    "Transport",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8], max_line: usize, expect: Expect, chunk: usize) -> Result<u64, Invalid> {
        let mut c = NdjsonCheck::new(max_line, expect);
        for part in bytes.chunks(chunk.max(1)) {
            c.feed(part);
        }
        c.finish()
    }

    const GOOD: &[u8] =
        b"{\"resourceType\":\"Patient\",\"id\":\"p1\",\"name\":[{\"family\":\"Muster\"}]}\n\
{\"resourceType\":\"Patient\",\"id\":\"p2\"}\r\n\n{\"id\":\"p3\",\"resourceType\":\"Patient\"}";

    #[test]
    fn the_type_list_is_sorted_and_has_r4_and_r5_types() {
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        for t in [
            "Patient",
            "Observation",
            "MedicationStatement",
            "Permission",
            "Media",
        ] {
            assert!(is_resource_type(t), "{t}");
        }
        for t in ["DomainResource", "Resource", "patient", ""] {
            assert!(!is_resource_type(t), "{t}");
        }
    }

    /// Lines are found across every chunking of the input, CRLF and blank lines included, and a
    /// last line without its newline counts.
    #[test]
    fn valid_ndjson_passes_however_it_is_chunked() {
        for chunk in [1, 2, 7, 64, 4096] {
            assert_eq!(
                check(GOOD, 1024, Expect::default(), chunk),
                Ok(3),
                "{chunk}"
            );
        }
        let expect = Expect {
            resource_type: Some("Patient".into()),
            count: Some(3),
        };
        assert_eq!(check(GOOD, 1024, expect, 5), Ok(3));
    }

    fn reason(bytes: &[u8], max_line: usize, expect: Expect) -> (Option<u64>, String) {
        let e = check(bytes, max_line, expect, 3).unwrap_err();
        assert_eq!(e.rule, "fhir-ndjson");
        (e.line, e.reason)
    }

    /// Each way a file can be wrong is found at its line, and the reason quotes nothing of it.
    #[test]
    fn each_defect_is_found_at_its_line_without_quoting_the_record() {
        let secret = "Mustermann";
        let cases: Vec<(Vec<u8>, Expect, Option<u64>, &str)> = vec![
            (
                [format!("{{\"resourceType\":\"Patient\",\"id\":\"1\"}}\n{{\"resourceType\":\"Patient\",\"id\":\"2\",\"n\":\"{secret}").as_bytes(), b"\xff\"}\n"].concat(),
                Expect::default(),
                Some(2),
                "UTF-8",
            ),
            (
                format!("{{\"resourceType\":\"Patient\",\"id\":\"1\",\"n\":\"{secret}").into_bytes(),
                Expect::default(),
                Some(1),
                "truncated",
            ),
            (
                format!("[{{\"resourceType\":\"Patient\",\"id\":\"{secret}\"}}]\n").into_bytes(),
                Expect::default(),
                Some(1),
                "not a JSON object",
            ),
            (
                format!("{{\"resourceType\":\"{secret}\",\"id\":\"1\"}}\n").into_bytes(),
                Expect::default(),
                Some(1),
                "not a FHIR",
            ),
            (
                format!("{{\"resourceType\":\"Patient\",\"name\":\"{secret}\"}}\n").into_bytes(),
                Expect::default(),
                Some(1),
                "without an id",
            ),
            (
                format!("{{\"resourceType\":\"Patient\",\"id\":{{\"x\":\"{secret}\"}}}}\n").into_bytes(),
                Expect::default(),
                Some(1),
                "not a string",
            ),
            (
                format!("{{\"resourceType\":\"Patient\",\"id\":\"1\"}}\n{{\"resourceType\":\"Observation\",\"id\":\"{secret}\"}}\n").into_bytes(),
                Expect { resource_type: Some("Patient".into()), count: None },
                Some(2),
                "resourceType Observation where the manifest lists this file as Patient",
            ),
            (
                b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n".to_vec(),
                Expect { resource_type: None, count: Some(2) },
                None,
                "1 resources where the manifest's count says 2",
            ),
            (
                format!("{{\"resourceType\":\"Patient\",\"id\":\"1\"}}\n{{\"resourceType\":\"Patient\",\"id\":\"2\",\"t\":\"{}\"}}\n", "x".repeat(200)).into_bytes(),
                Expect::default(),
                Some(2),
                "longer than max_line",
            ),
            (
                format!("{{\"resourceType\":\"Patient\" \"id\":\"{secret}\"}}\n").into_bytes(),
                Expect::default(),
                Some(1),
                "not valid JSON",
            ),
        ];
        for (bytes, expect, line, want) in cases {
            let (got_line, why) = reason(&bytes, 100, expect);
            assert!(why.contains(want), "{why:?} should say {want:?}");
            assert_eq!(got_line, line, "{why}");
            assert!(!why.contains(secret), "{why:?} quotes the record");
        }
    }

    /// The buffer never holds more than one line: a line of max_line passes, one byte more fails,
    /// whether or not it spans chunks.
    #[test]
    fn memory_is_bounded_by_max_line() {
        let body = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"1\",\"t\":\"{}\"}}",
            "y".repeat(50)
        );
        let max = body.len();
        for chunk in [1, 10, 1000] {
            assert!(check(
                format!("{body}\n").as_bytes(),
                max,
                Expect::default(),
                chunk
            )
            .is_ok());
            assert!(check(
                format!("{body}\n").as_bytes(),
                max - 1,
                Expect::default(),
                chunk
            )
            .is_err());
        }
        let mut c = NdjsonCheck::new(64, Expect::default());
        c.feed(&[b'{'; 10_000]);
        assert!(c.failed());
        assert!(c.partial.capacity() <= 64 * 2);
    }
}
