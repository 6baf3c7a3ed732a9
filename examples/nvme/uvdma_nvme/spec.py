"""NVMe registers and data structures as the specification names them.

NVM Express Base Specification 2.0 ("NVMe 2.0") and NVM Command Set Specification 1.0
("NVM 1.0").  Each structure is a ctypes ``LittleEndianStructure`` with the spec's field
names (upper case, as printed) and explicit reserved fields, so ``ctypes.sizeof`` and the
field offsets match the figures; tests/unit/test_nvme_spec.py pins them.  The driver's hot
paths (an SQE packed with one ``struct.pack_into``, a CQE read as 32-bit words) use the
same layouts, checked against these structures by the same tests.
"""

from __future__ import annotations

import ctypes
import enum
from typing import TypeVar

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

S = TypeVar("S", bound="Register")

PAGE = 4096  # CC.MPS = 0: memory pages of 4 KiB
DOORBELLS = 0x1000  # NVMe 2.0, 3.1.4.20: SQ 0 tail doorbell


class Reg(enum.IntEnum):
    """Controller register offsets (NVMe 2.0, 3.1.4, Figure 35)."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30


class Register(ctypes.LittleEndianStructure):
    """A register as bit fields; ``from_value``/``value`` convert to and from the integer
    read from or written to the BAR."""

    _pack_ = 1

    @classmethod
    def from_value(cls: type[S], value: int) -> S:
        """Decode a register value."""
        return cls.from_buffer_copy(value.to_bytes(ctypes.sizeof(cls), "little"))

    @property
    def value(self) -> int:
        """The register as an integer, to write to the BAR."""
        return int.from_bytes(bytes(self), "little")


class CAP(Register):
    """Controller Capabilities (NVMe 2.0, 3.1.4.1, Figure 36)."""

    _fields_ = [
        ("MQES", u64, 16),  # Maximum Queue Entries Supported (0's based)
        ("CQR", u64, 1),  # Contiguous Queues Required
        ("AMS", u64, 2),  # Arbitration Mechanism Supported
        ("rsvd19", u64, 5),
        ("TO", u64, 8),  # Timeout, in 500 ms units
        ("DSTRD", u64, 4),  # Doorbell Stride: 2 ^ (2 + DSTRD) bytes
        ("NSSRS", u64, 1),  # NVM Subsystem Reset Supported
        ("CSS", u64, 8),  # Command Sets Supported (bit 0: NVM)
        ("BPS", u64, 1),  # Boot Partition Support
        ("CPS", u64, 2),  # Controller Power Scope
        ("MPSMIN", u64, 4),  # Memory Page Size Minimum: 2 ^ (12 + MPSMIN)
        ("MPSMAX", u64, 4),
        ("PMRS", u64, 1),
        ("CMBS", u64, 1),
        ("NSSS", u64, 1),
        ("CRMS", u64, 2),
        ("rsvd61", u64, 3),
    ]


class VS(Register):
    """Version (NVMe 2.0, 3.1.4.2)."""

    _fields_ = [("TER", u32, 8), ("MNR", u32, 8), ("MJR", u32, 16)]


class CC(Register):
    """Controller Configuration (NVMe 2.0, 3.1.4.5, Figure 41)."""

    _fields_ = [
        ("EN", u32, 1),  # Enable
        ("rsvd1", u32, 3),
        ("CSS", u32, 3),  # I/O Command Set Selected (000b: NVM)
        ("MPS", u32, 4),  # Memory Page Size: 2 ^ (12 + MPS)
        ("AMS", u32, 3),  # Arbitration Mechanism Selected
        ("SHN", u32, 2),  # Shutdown Notification (01b: normal)
        ("IOSQES", u32, 4),  # I/O SQ Entry Size: 2 ^ n (6: 64 bytes)
        ("IOCQES", u32, 4),  # I/O CQ Entry Size (4: 16 bytes)
        ("CRIME", u32, 1),
        ("rsvd25", u32, 7),
    ]


class CSTS(Register):
    """Controller Status (NVMe 2.0, 3.1.4.6, Figure 42)."""

    _fields_ = [
        ("RDY", u32, 1),  # Ready
        ("CFS", u32, 1),  # Controller Fatal Status
        ("SHST", u32, 2),  # Shutdown Status (10b: complete)
        ("NSSRO", u32, 1),
        ("PP", u32, 1),
        ("ST", u32, 1),
        ("rsvd7", u32, 25),
    ]


class AQA(Register):
    """Admin Queue Attributes (NVMe 2.0, 3.1.4.8): queue sizes, 0's based."""

    _fields_ = [("ASQS", u32, 12), ("rsvd12", u32, 4), ("ACQS", u32, 12), ("rsvd28", u32, 4)]


CSTS_RDY, CSTS_CFS = 0x1, 0x2  # the bits a hot poll tests without decoding
SHST_COMPLETE = 0b10
SHN_NORMAL = 0b01
ALL_ONES = 0xFFFFFFFF  # what a 32-bit read returns from a device that is gone


class SQE(ctypes.LittleEndianStructure):
    """A submission queue entry: the common command format (NVMe 2.0, 4.2, Figure 88),
    with PRP1/PRP2 as the data pointer."""

    _pack_ = 1
    _fields_ = [
        ("OPC", u8),  # CDW0 7:0 opcode
        ("FUSE_PSDT", u8),  # CDW0 9:8 FUSE, 15:14 PSDT (0: PRPs)
        ("CID", u16),  # CDW0 31:16 command identifier
        ("NSID", u32),
        ("CDW2", u32),
        ("CDW3", u32),
        ("MPTR", u64),
        ("PRP1", u64),
        ("PRP2", u64),
        ("CDW10", u32),
        ("CDW11", u32),
        ("CDW12", u32),
        ("CDW13", u32),
        ("CDW14", u32),
        ("CDW15", u32),
    ]


#: SQE fields in order, for one ``struct.pack_into`` on the hot path: CDW0 (OPC | CID << 16),
#: NSID, CDW2+CDW3, MPTR, PRP1, PRP2, CDW10..CDW15.  Same layout as :class:`SQE`.
SQE_FORMAT = "<IIQQQQ6I"


class CQE(ctypes.LittleEndianStructure):
    """A completion queue entry (NVMe 2.0, 4.6, Figure 90).  DW3 holds CID (15:0), the
    Phase Tag (16) and the Status Field (31:17)."""

    _pack_ = 1
    _fields_ = [
        ("DW0", u32),  # command specific
        ("DW1", u32),
        ("SQHD", u16),  # SQ head pointer
        ("SQID", u16),
        ("CID", u16),
        ("STATUS_P", u16),  # bit 0: Phase Tag; 15:1: Status Field (SC 7:0, SCT 10:8, ...)
    ]


class IdentifyController(ctypes.LittleEndianStructure):
    """Identify Controller data structure (CNS 01h; NVMe 2.0, Figure 275)."""

    _pack_ = 1
    _fields_ = [
        ("VID", u16),
        ("SSVID", u16),
        ("SN", ctypes.c_char * 20),  # serial number, ASCII, space padded
        ("MN", ctypes.c_char * 40),  # model number
        ("FR", ctypes.c_char * 8),  # firmware revision
        ("RAB", u8),
        ("IEEE", u8 * 3),
        ("CMIC", u8),
        ("MDTS", u8),  # maximum data transfer size: 2 ^ MDTS minimum pages; 0: no limit
        ("CNTLID", u16),
        ("VER", u32),
        ("RTD3R", u32),
        ("RTD3E", u32),
        ("OAES", u32),
        ("CTRATT", u32),
        ("RRLS", u16),
        ("rsvd102", u8 * 9),
        ("CNTRLTYPE", u8),
        ("FGUID", u8 * 16),
        ("CRDT1", u16),
        ("CRDT2", u16),
        ("CRDT3", u16),
        ("rsvd134", u8 * 106),
        ("NVMEMI", u8 * 16),
        ("OACS", u16),
        ("ACL", u8),  # Abort Command Limit (0's based)
        ("AERL", u8),
        ("FRMW", u8),
        ("LPA", u8),
        ("ELPE", u8),  # Error Log Page Entries (0's based)
        ("NPSS", u8),
        ("AVSCC", u8),
        ("APSTA", u8),
        ("WCTEMP", u16),
        ("CCTEMP", u16),
        ("MTFA", u16),
        ("HMPRE", u32),
        ("HMMIN", u32),
        ("TNVMCAP", u8 * 16),
        ("UNVMCAP", u8 * 16),
        ("RPMBS", u32),
        ("EDSTT", u16),
        ("DSTO", u8),
        ("FWUG", u8),
        ("KAS", u16),
        ("HCTMA", u16),
        ("MNTMT", u16),
        ("MXTMT", u16),
        ("SANICAP", u32),
        ("HMMINDS", u32),
        ("HMMAXD", u16),
        ("NSETIDMAX", u16),
        ("ENDGIDMAX", u16),
        ("ANATT", u8),
        ("ANACAP", u8),
        ("ANAGRPMAX", u32),
        ("NANAGRPID", u32),
        ("PELS", u32),
        ("DOMAINID", u16),
        ("rsvd358", u8 * 10),
        ("MEGCAP", u8 * 16),
        ("rsvd384", u8 * 128),
        ("SQES", u8),
        ("CQES", u8),
        ("MAXCMD", u16),
        ("NN", u32),  # number of namespaces
        ("ONCS", u16),
        ("FUSES", u16),
        ("FNA", u8),
        ("VWC", u8),  # volatile write cache
        ("AWUN", u16),
        ("AWUPF", u16),
        ("ICSVSCC", u8),
        ("NWPC", u8),
        ("ACWU", u16),
        ("CDFS", u16),
        ("SGLS", u32),
        ("MNAN", u32),
        ("MAXDNA", u8 * 16),
        ("MAXCNA", u32),
        ("rsvd564", u8 * 204),
        ("SUBNQN", ctypes.c_char * 256),
        ("rsvd1024", u8 * 768),
        ("NVMEOF", u8 * 256),
        ("PSD", u8 * 1024),  # power state descriptors 0..31, 32 bytes each
        ("VS", u8 * 1024),  # vendor specific
    ]


class LBAF(ctypes.LittleEndianStructure):
    """LBA Format Data Structure (NVM 1.0, Figure 98)."""

    _pack_ = 1
    _fields_ = [
        ("MS", u16),  # metadata size
        ("LBADS", u8),  # LBA data size: 2 ^ LBADS bytes
        ("RP", u8, 2),  # relative performance
        ("rsvd", u8, 6),
    ]


class IdentifyNamespace(ctypes.LittleEndianStructure):
    """Identify Namespace data structure for the NVM command set (CNS 00h; NVM 1.0,
    Figure 97)."""

    _pack_ = 1
    _fields_ = [
        ("NSZE", u64),  # namespace size, in LBAs
        ("NCAP", u64),
        ("NUSE", u64),
        ("NSFEAT", u8),
        ("NLBAF", u8),  # number of LBA formats (0's based)
        ("FLBAS", u8),  # formatted LBA size: 3:0 the format index (with 6:5 above 16)
        ("MC", u8),
        ("DPC", u8),
        ("DPS", u8),
        ("NMIC", u8),
        ("RESCAP", u8),
        ("FPI", u8),
        ("DLFEAT", u8),
        ("NAWUN", u16),
        ("NAWUPF", u16),
        ("NACWU", u16),
        ("NABSN", u16),
        ("NABO", u16),
        ("NABSPF", u16),
        ("NOIOB", u16),
        ("NVMCAP", u8 * 16),
        ("NPWG", u16),
        ("NPWA", u16),
        ("NPDG", u16),
        ("NPDA", u16),
        ("NOWS", u16),
        ("MSSRL", u16),
        ("MCL", u32),
        ("MSRC", u8),
        ("rsvd81", u8),
        ("NULBAF", u8),
        ("rsvd83", u8 * 9),
        ("ANAGRPID", u32),
        ("rsvd96", u8 * 3),
        ("NSATTR", u8),
        ("NVMSETID", u16),
        ("ENDGID", u16),
        ("NGUID", u8 * 16),
        ("EUI64", u8 * 8),
        ("LBAF", LBAF * 64),
        ("VS", u8 * 3712),
    ]

    @property
    def lba_format(self) -> LBAF:
        """The LBA format in use (FLBAS bits 3:0, and 6:5 as the high bits past 16)."""
        index = (self.FLBAS & 0xF) | ((self.FLBAS >> 5) & 0x3) << 4
        return LBAF.from_buffer_copy(self, IdentifyNamespace.LBAF.offset + 4 * index)


class SmartLog(ctypes.LittleEndianStructure):
    """SMART / Health Information log page (log 02h; NVMe 2.0, Figure 207).  The 128-bit
    counters are little-endian byte arrays: :func:`u128` reads them."""

    _pack_ = 1
    _fields_ = [
        ("CRITICAL_WARNING", u8),
        ("COMPOSITE_TEMPERATURE", u16),  # kelvin
        ("AVAILABLE_SPARE", u8),  # percent
        ("AVAILABLE_SPARE_THRESHOLD", u8),
        ("PERCENTAGE_USED", u8),
        ("ENDURANCE_GROUP_CRITICAL_WARNING", u8),
        ("rsvd7", u8 * 25),
        ("DATA_UNITS_READ", u8 * 16),  # thousands of 512-byte units
        ("DATA_UNITS_WRITTEN", u8 * 16),
        ("HOST_READ_COMMANDS", u8 * 16),
        ("HOST_WRITE_COMMANDS", u8 * 16),
        ("CONTROLLER_BUSY_TIME", u8 * 16),
        ("POWER_CYCLES", u8 * 16),
        ("POWER_ON_HOURS", u8 * 16),
        ("UNSAFE_SHUTDOWNS", u8 * 16),
        ("MEDIA_ERRORS", u8 * 16),
        ("NUM_ERR_LOG_ENTRIES", u8 * 16),
        ("WARNING_TEMP_TIME", u32),
        ("CRITICAL_TEMP_TIME", u32),
        ("TEMP_SENSOR", u16 * 8),
        ("TMT1_TRANSITION_COUNT", u32),
        ("TMT2_TRANSITION_COUNT", u32),
        ("TMT1_TOTAL_TIME", u32),
        ("TMT2_TOTAL_TIME", u32),
        ("rsvd232", u8 * 280),
    ]


class ErrorLogEntry(ctypes.LittleEndianStructure):
    """Error Information log entry (log 01h; NVMe 2.0, Figure 205)."""

    _pack_ = 1
    _fields_ = [
        ("ERROR_COUNT", u64),
        ("SQID", u16),
        ("CID", u16),
        ("STATUS", u16),  # bit 0: phase tag; 15:1 the Status Field
        ("PARAMETER_ERROR_LOCATION", u16),
        ("LBA", u64),
        ("NSID", u32),
        ("VSIA", u8),
        ("TRTYPE", u8),
        ("rsvd30", u8 * 2),
        ("CSI", u64),
        ("TTSI", u16),
        ("rsvd42", u8 * 22),
    ]


def u128(field: ctypes.Array[ctypes.c_uint8]) -> int:
    """A 128-bit little-endian counter."""
    return int.from_bytes(bytes(field), "little")


def text(field: bytes) -> str:
    """An ASCII identification field, trailing spaces (and NULs) removed."""
    return field.decode("ascii", errors="replace").rstrip(" \0")


class AdminOpcode(enum.IntEnum):
    """Admin command opcodes (NVMe 2.0, 5, Figure 138)."""

    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A


class IoOpcode(enum.IntEnum):
    """NVM command set I/O opcodes (NVM 1.0, 3, Figure 18)."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02


class Cns(enum.IntEnum):
    """Identify CNS values (NVMe 2.0, 5.17.1, Figure 273)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02


class Feature(enum.IntEnum):
    """Feature identifiers (NVMe 2.0, 5.27.1, Figure 317)."""

    NUMBER_OF_QUEUES = 0x07


class LogPage(enum.IntEnum):
    """Log page identifiers (NVMe 2.0, 5.16.1, Figure 202)."""

    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02


NSID_ALL = 0xFFFFFFFF
