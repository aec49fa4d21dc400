"""Synthetic HL7 v2 messages shared by the hl7 tests (invented names and numbers only)."""

import pytest

ADT_LINES = [
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC^1.2.3^ISO|20240102030405||ADT^A01^ADT_A01|CTRL0001|P|2.5.1"
    "|||AL|NE||UNICODE UTF-8",
    "EVN|A01|20240102030405",
    "PID|1||MRN001^^^HOSP&1.2.3&ISO^MR~SSN002^^^SSA^SS||DOE^JANE^Q~SMITH^JANE||19800101|F|||"
    "1 MAIN ST^^SPRINGFIELD^ST^12345||555\\T\\1234|\"\"",
    "PV1|1|I|WARD^101^A",
    "OBX|1|ST|CODE1^First||value one||||||F",
    "OBX|2|TX|CODE2^Second||line\\.br\\two \\F\\ pipe||||||F",
    "OBX|3|NM|CODE3^Third&Sub||42|mg&milligram||||||F",
]


@pytest.fixture
def adt_text() -> str:
    return "\r".join(ADT_LINES) + "\r"


@pytest.fixture
def adt_bytes(adt_text) -> bytes:
    return adt_text.encode("utf-8")
