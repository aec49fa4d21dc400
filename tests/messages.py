"""The project's own synthetic HL7 v2 messages: invented people, invented places."""

from __future__ import annotations


def adt_a01(control_id: str = "MSG00001", *, family: str = "DOE", given: str = "JANE",
            mrn: str = "MRN100001", ssn: str = "987-65-4320", sender: str = "ADT_APP",
            facility: str = "GENERAL_HOSP",
            version: str = "2.5.1", accept_ack: str = "", app_ack: str = "",
            charset: str = "", receiver: str = "ENGINE", receiving_facility: str = "HUB",
            extra_segments: str = "", sep: str = "\r") -> bytes:
    segments = [
        f"MSH|^~\\&|{sender}|{facility}|{receiver}|{receiving_facility}|20260101120000||ADT^A01^ADT_A01|"
        f"{control_id}|P|{version}|||{accept_ack}|{app_ack}||{charset}",
        "EVN|A01|20260101120000",
        f"PID|1||{mrn}^^^GEN^MR||{family}^{given}^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^ST^00000||"
        f"555-0100|||S|||{ssn}",
        "NK1|1|DOE^JOHN|SPO|1 MAIN ST^^SPRINGFIELD^ST^00000|555-0101",
        "PV1|1|I|WARD1^101^A^GEN||||1234^WELBY^MARCUS|||MED||||ADM|||1234^WELBY^MARCUS|IN||||||||"
        "||||||||||||||||||20260101115500",
        "AL1|1|DA|PCN^PENICILLIN^L|SV|HIVES",
        "DG1|1||I10^ESSENTIAL HYPERTENSION^I10||20260101|A",
    ]
    if extra_segments:
        segments.append(extra_segments)
    return (sep.join(segments) + sep).encode("utf-8")


def oru_r01(control_id: str = "LAB00001", *, mrn: str = "MRN100001", family: str = "DOE",
            given: str = "JANE", order: str = "ORD1001", observed: str = "20260103093000") -> bytes:
    segments = [
        f"MSH|^~\\&|LAB_APP|GENERAL_LAB|ENGINE|HUB|20260103101500-0500||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{mrn}^^^GEN^MR||{family}^{given}||19800101|F",
        f"OBR|1|{order}|FIL{order}|24331-1^LIPID PANEL^LN|||{observed}|||||||||||||||20260103100000|||F",
        f"OBX|1|NM|2093-3^CHOLESTEROL^LN||182.0417|mg/dL^^UCUM|<200|N|||F|||{observed}",
        f"OBX|2|NM|2571-8^TRIGLYCERIDE^LN||95|mg/dL^^UCUM|<150|N|||F|||{observed}",
        "NTE|1||Fasting sample",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")
