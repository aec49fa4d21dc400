"""FHIR output: the template namespace for HL7 v2 datatypes and the Bundle a FHIR template becomes."""
