"""Xen's libxc migration stream (format v2/v3) for x86 HVM guests: writer, reader, inspector.

The streams follow ``docs/specs/libxc-migration-stream.pandoc`` and pass Xen's own verifier
``tools/python/scripts/verify-stream-v2``. One module per job:

* :mod:`~vmce.save.stream.format`: constants, enums, header and body layouts, errors;
* :mod:`~vmce.save.stream.rules`: which records, how often, in which order;
* :mod:`~vmce.save.stream.codecs`: record bodies (PAGE_DATA, TSC, params, policies);
* :mod:`~vmce.save.stream.summary`: :class:`Stream` and :class:`RecordSummary`;
* :mod:`~vmce.save.stream.writer`: :class:`StreamWriter`, record by record;
* :mod:`~vmce.save.stream.reader`: :class:`StreamReader`, strict framing and order;
* :mod:`~vmce.save.stream.api`: :func:`write_stream`, :func:`read_stream`,
  :func:`inspect_stream`.

The HVM_CONTEXT body is the blob of :mod:`vmce.save.hvmctx`, with vmce's in-flight vMCE
trailer described in :mod:`vmce.save.hvmrecords`.
"""

from vmce.save.stream.api import (
    PageSink,
    StreamContents,
    inspect_stream,
    read_stream,
    write_stream,
)
from vmce.save.stream.codecs import MAX_PAGES_PER_RECORD, PageEntry
from vmce.save.stream.format import (
    CURRENT_VERSION,
    IHDR_ID,
    IHDR_MARKER,
    PAGE_SIZE,
    REC_LENGTH_MAX,
    REC_TYPE_OPTIONAL,
    SUPPORTED_VERSIONS,
    CpuidLeaf,
    DomainHeader,
    DomainType,
    HvmParamEntry,
    HvmParamsHeader,
    ImageHeader,
    ImageOption,
    MsrPolicyEntry,
    PageDataHeader,
    PageType,
    RecordError,
    RecordHeader,
    RecordType,
    StreamError,
    TscInfo,
)
from vmce.save.stream.reader import RawRecord, StreamReader
from vmce.save.stream.summary import RecordSummary, Stream
from vmce.save.stream.writer import PageItem, StreamWriter

__all__ = [
    "CURRENT_VERSION",
    "IHDR_ID",
    "IHDR_MARKER",
    "MAX_PAGES_PER_RECORD",
    "PAGE_SIZE",
    "REC_LENGTH_MAX",
    "REC_TYPE_OPTIONAL",
    "SUPPORTED_VERSIONS",
    "CpuidLeaf",
    "DomainHeader",
    "DomainType",
    "HvmParamEntry",
    "HvmParamsHeader",
    "ImageHeader",
    "ImageOption",
    "MsrPolicyEntry",
    "PageDataHeader",
    "PageEntry",
    "PageItem",
    "PageSink",
    "PageType",
    "RawRecord",
    "RecordError",
    "RecordHeader",
    "RecordSummary",
    "RecordType",
    "Stream",
    "StreamContents",
    "StreamError",
    "StreamReader",
    "StreamWriter",
    "TscInfo",
    "inspect_stream",
    "read_stream",
    "write_stream",
]
