"""Typed objects shared by every layer (msgspec structs), and the parsing of untrusted input into them.

Why msgspec and not pydantic v2: it decodes JSON bytes straight into typed structs in one C pass,
validating as it goes (wrong types, constraints, depth), names the failing field in one line
(``Expected `str`, got `int` - at `$.Name```), imports in a few milliseconds and keeps objects small.
The CLI's start time and the daemon's memory are goals of their own (issue 12); pydantic costs
tens of MiB and ~100 ms of imports for features we do not use.
"""
