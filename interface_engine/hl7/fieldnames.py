"""Names of the fields of common HL7 v2 segments (as of v2.5), for people reading a message.

Only for display: nothing routes or validates by these names. A segment not listed
here shows its field numbers alone. Each entry lists fields 1, 2, 3... in order.
"""

from __future__ import annotations

_NAMES = {
    "MSH": """Field separator; Encoding characters; Sending application; Sending facility;
        Receiving application; Receiving facility; Message date/time; Security; Message type;
        Message control id; Processing id; Version id; Sequence number; Continuation pointer;
        Accept acknowledgment type; Application acknowledgment type; Country code;
        Character set; Principal language of message; Alternate character set handling scheme;
        Message profile identifier""",
    "EVN": """Event type code; Recorded date/time; Date/time planned event; Event reason code;
        Operator id; Event occurred; Event facility""",
    "PID": """Set id; Patient id (external); Patient identifier list; Alternate patient id;
        Patient name; Mother's maiden name; Date/time of birth; Administrative sex; Patient alias;
        Race; Patient address; County code; Phone number, home; Phone number, business;
        Primary language; Marital status; Religion; Patient account number; SSN number;
        Driver's license number; Mother's identifier; Ethnic group; Birth place;
        Multiple birth indicator; Birth order; Citizenship; Veterans military status;
        Nationality; Patient death date/time; Patient death indicator; Identity unknown indicator;
        Identity reliability code; Last update date/time; Last update facility; Species code;
        Breed code; Strain; Production class code; Tribal citizenship""",
    "PD1": """Living dependency; Living arrangement; Patient primary facility;
        Patient primary care provider; Student indicator; Handicap; Living will code;
        Organ donor code; Separate bill; Duplicate patient; Publicity code;
        Protection indicator; Protection indicator effective date; Place of worship;
        Advance directive code; Immunization registry status;
        Immunization registry status effective date; Publicity code effective date;
        Military branch; Military rank/grade; Military status""",
    "NK1": """Set id; Name; Relationship; Address; Phone number; Business phone number;
        Contact role; Start date; End date; Next of kin job title; Next of kin job code/class;
        Next of kin employee number; Organization name; Marital status; Administrative sex;
        Date/time of birth; Living dependency; Ambulatory status; Citizenship;
        Primary language; Living arrangement; Publicity code; Protection indicator;
        Student indicator; Religion; Mother's maiden name; Nationality; Ethnic group;
        Contact reason; Contact person's name; Contact person's telephone number;
        Contact person's address; Next of kin identifiers; Job status; Race; Handicap;
        Contact person social security number; Next of kin birth place; VIP indicator""",
    "PV1": """Set id; Patient class; Assigned patient location; Admission type;
        Preadmit number; Prior patient location; Attending doctor; Referring doctor;
        Consulting doctor; Hospital service; Temporary location; Preadmit test indicator;
        Re-admission indicator; Admit source; Ambulatory status; VIP indicator;
        Admitting doctor; Patient type; Visit number; Financial class;
        Charge price indicator; Courtesy code; Credit rating; Contract code;
        Contract effective date; Contract amount; Contract period; Interest code;
        Transfer to bad debt code; Transfer to bad debt date; Bad debt agency code;
        Bad debt transfer amount; Bad debt recovery amount; Delete account indicator;
        Delete account date; Discharge disposition; Discharged to location; Diet type;
        Servicing facility; Bed status; Account status; Pending location;
        Prior temporary location; Admit date/time; Discharge date/time;
        Current patient balance; Total charges; Total adjustments; Total payments;
        Alternate visit id; Visit indicator; Other healthcare provider""",
    "PV2": """Prior pending location; Accommodation code; Admit reason; Transfer reason;
        Patient valuables; Patient valuables location; Visit user code;
        Expected admit date/time; Expected discharge date/time;
        Estimated length of inpatient stay; Actual length of inpatient stay;
        Visit description; Referral source code; Previous service date;
        Employment illness related indicator; Purge status code; Purge status date;
        Special program code; Retention indicator; Expected number of insurance plans;
        Visit publicity code; Visit protection indicator; Clinic organization name;
        Patient status code; Visit priority code; Previous treatment date;
        Expected discharge disposition; Signature on file date; First similar illness date;
        Patient charge adjustment code; Recurring service code; Billing media code;
        Expected surgery date/time; Military partnership code; Military non-availability code;
        Newborn baby indicator; Baby detained indicator; Mode of arrival code;
        Recreational drug use code; Admission level of care code; Precaution code;
        Patient condition code; Living will code; Organ donor code; Advance directive code;
        Patient status effective date; Expected LOA return date/time;
        Expected pre-admission testing date/time; Notify clergy code""",
    "ORC": """Order control; Placer order number; Filler order number; Placer group number;
        Order status; Response flag; Quantity/timing; Parent order; Date/time of transaction;
        Entered by; Verified by; Ordering provider; Enterer's location; Call back phone number;
        Order effective date/time; Order control code reason; Entering organization;
        Entering device; Action by; Advanced beneficiary notice code;
        Ordering facility name; Ordering facility address; Ordering facility phone number;
        Ordering provider address; Order status modifier;
        Advanced beneficiary notice override reason; Filler's expected availability date/time;
        Confidentiality code; Order type; Enterer authorization mode;
        Parent universal service identifier""",
    "OBR": """Set id; Placer order number; Filler order number; Universal service identifier;
        Priority; Requested date/time; Observation date/time; Observation end date/time;
        Collection volume; Collector identifier; Specimen action code; Danger code;
        Relevant clinical information; Specimen received date/time; Specimen source;
        Ordering provider; Order callback phone number; Placer field 1; Placer field 2;
        Filler field 1; Filler field 2; Results report/status change date/time;
        Charge to practice; Diagnostic service section id; Result status; Parent result;
        Quantity/timing; Result copies to; Parent; Transportation mode;
        Reason for study; Principal result interpreter; Assistant result interpreter;
        Technician; Transcriptionist; Scheduled date/time; Number of sample containers;
        Transport logistics of collected sample; Collector's comment;
        Transport arrangement responsibility; Transport arranged; Escort required;
        Planned patient transport comment; Procedure code; Procedure code modifier;
        Placer supplemental service information; Filler supplemental service information;
        Medically necessary duplicate procedure reason; Result handling;
        Parent universal service identifier""",
    "OBX": """Set id; Value type; Observation identifier; Observation sub-id;
        Observation value; Units; Reference range; Abnormal flags; Probability;
        Nature of abnormal test; Observation result status;
        Effective date of reference range; User defined access checks;
        Date/time of the observation; Producer's id; Responsible observer;
        Observation method; Equipment instance identifier; Date/time of the analysis""",
    "NTE": "Set id; Source of comment; Comment; Comment type",
    "AL1": """Set id; Allergen type code; Allergen code/mnemonic/description;
        Allergy severity code; Allergy reaction code; Identification date""",
    "DG1": """Set id; Diagnosis coding method; Diagnosis code; Diagnosis description;
        Diagnosis date/time; Diagnosis type; Major diagnostic category;
        Diagnostic related group; DRG approval indicator; DRG grouper review code;
        Outlier type; Outlier days; Outlier cost; Grouper version and type;
        Diagnosis priority; Diagnosing clinician; Diagnosis classification;
        Confidential indicator; Attestation date/time; Diagnosis identifier;
        Diagnosis action code""",
    "PR1": """Set id; Procedure coding method; Procedure code; Procedure description;
        Procedure date/time; Procedure functional type; Procedure minutes; Anesthesiologist;
        Anesthesia code; Anesthesia minutes; Surgeon; Procedure practitioner;
        Consent code; Procedure priority; Associated diagnosis code; Procedure code modifier;
        Procedure DRG type; Tissue type code; Procedure identifier; Procedure action code""",
    "IN1": """Set id; Insurance plan id; Insurance company id; Insurance company name;
        Insurance company address; Insurance company contact person;
        Insurance company phone number; Group number; Group name; Insured's group employer id;
        Insured's group employer name; Plan effective date; Plan expiration date;
        Authorization information; Plan type; Name of insured;
        Insured's relationship to patient; Insured's date of birth; Insured's address;
        Assignment of benefits; Coordination of benefits; Coordination of benefits priority;
        Notice of admission flag; Notice of admission date; Report of eligibility flag;
        Report of eligibility date; Release information code; Pre-admit cert;
        Verification date/time; Verification by; Type of agreement code; Billing status;
        Lifetime reserve days; Delay before lifetime reserve day; Company plan code;
        Policy number; Policy deductible; Policy limit, amount; Policy limit, days;
        Room rate, semi-private; Room rate, private; Insured's employment status;
        Insured's administrative sex; Insured's employer's address; Verification status;
        Prior insurance plan id; Coverage type; Handicap; Insured's id number;
        Signature code; Signature code date; Insured's birth place; VIP indicator""",
    "MSA": """Acknowledgment code; Message control id; Text message;
        Expected sequence number; Delayed acknowledgment type; Error condition""",
    "ERR": """Error code and location; Error location; HL7 error code; Severity;
        Application error code; Application error parameter; Diagnostic information;
        User message; Inform person indicator; Override type; Override reason code;
        Help desk contact point""",
    "SPM": """Set id; Specimen id; Specimen parent ids; Specimen type;
        Specimen type modifier; Specimen additives; Specimen collection method;
        Specimen source site; Specimen source site modifier; Specimen collection site;
        Specimen role; Specimen collection amount; Grouped specimen count;
        Specimen description; Specimen handling code; Specimen risk code;
        Specimen collection date/time; Specimen received date/time;
        Specimen expiration date/time; Specimen availability; Specimen reject reason;
        Specimen quality; Specimen appropriateness; Specimen condition;
        Specimen current quantity; Number of specimen containers; Container type;
        Container condition; Specimen child role""",
    "RXA": """Give sub-id counter; Administration sub-id counter;
        Date/time start of administration; Date/time end of administration;
        Administered code; Administered amount; Administered units;
        Administered dosage form; Administration notes; Administering provider;
        Administered-at location; Administered per (time unit); Administered strength;
        Administered strength units; Substance lot number; Substance expiration date;
        Substance manufacturer name; Substance/treatment refusal reason; Indication;
        Completion status; Action code; System entry date/time;
        Administered drug strength volume; Administered drug strength volume units;
        Administered barcode identifier; Pharmacy order type""",
    "SCH": """Placer appointment id; Filler appointment id; Occurrence number;
        Placer group number; Schedule id; Event reason; Appointment reason; Appointment type;
        Appointment duration; Appointment duration units; Appointment timing quantity;
        Placer contact person; Placer contact phone number; Placer contact address;
        Placer contact location; Filler contact person; Filler contact phone number;
        Filler contact address; Filler contact location; Entered by person;
        Entered by phone number; Entered by location; Parent placer appointment id;
        Parent filler appointment id; Filler status code; Placer order number;
        Filler order number""",
    "TXA": """Set id; Document type; Document content presentation; Activity date/time;
        Primary activity provider; Origination date/time; Transcription date/time;
        Edit date/time; Originator; Assigned document authenticator; Transcriptionist;
        Unique document number; Parent document number; Placer order number;
        Filler order number; Unique document file name; Document completion status;
        Document confidentiality status; Document availability status;
        Document storage status; Document change reason;
        Authentication person, time stamp; Distributed copies; Folder assignment;
        Document title; Agreed due date/time""",
    "MRG": """Prior patient identifier list; Prior alternate patient id;
        Prior patient account number; Prior patient id; Prior visit number;
        Prior alternate visit id; Prior patient name""",
}

FIELD_NAMES: dict[str, tuple[str, ...]] = {
    segment: tuple(" ".join(name.split()) for name in text.split(";"))
    for segment, text in _NAMES.items()
}


def field_name(segment: str, number: int) -> str:
    """The field's name, or '' when this table does not know it."""
    names = FIELD_NAMES.get(segment, ())
    return names[number - 1] if 0 < number <= len(names) else ""
