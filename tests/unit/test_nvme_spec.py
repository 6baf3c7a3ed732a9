"""The NVMe structures against the specification's figures: sizes, field offsets and bit
positions, and the hot paths' raw layouts (one struct.pack_into per SQE, CQE DW3 read as a
word) against the structures."""

from __future__ import annotations

import ctypes
import struct

import pytest

from uvdma_nvme.spec import (
    AQA,
    CAP,
    CC,
    CQE,
    CSTS,
    SQE,
    SQE_FORMAT,
    VS,
    ErrorLogEntry,
    IdentifyController,
    IdentifyNamespace,
    SmartLog,
)


@pytest.mark.parametrize(
    ("struct_", "size", "offsets"),
    [
        (CAP, 8, {}),
        (CC, 4, {}),
        (CSTS, 4, {}),
        (AQA, 4, {}),
        (VS, 4, {}),
        (SQE, 64, {"CID": 2, "NSID": 4, "MPTR": 16, "PRP1": 24, "PRP2": 32, "CDW10": 40}),
        (CQE, 16, {"DW0": 0, "SQHD": 8, "SQID": 10, "CID": 12, "STATUS_P": 14}),
        (
            IdentifyController,
            4096,
            {
                "SN": 4,
                "MN": 24,
                "FR": 64,
                "MDTS": 77,
                "CNTLID": 78,
                "VER": 80,
                "CNTRLTYPE": 111,
                "OACS": 256,
                "ACL": 258,
                "ELPE": 262,
                "WCTEMP": 266,
                "TNVMCAP": 280,
                "SANICAP": 328,
                "MEGCAP": 368,
                "SQES": 512,
                "MAXCMD": 514,
                "NN": 516,
                "ONCS": 520,
                "VWC": 525,
                "SGLS": 536,
                "MAXCNA": 560,
                "SUBNQN": 768,
                "PSD": 2048,
                "VS": 3072,
            },
        ),
        (
            IdentifyNamespace,
            4096,
            {
                "NCAP": 8,
                "NUSE": 16,
                "NLBAF": 25,
                "FLBAS": 26,
                "NVMCAP": 48,
                "MCL": 76,
                "NULBAF": 82,
                "ANAGRPID": 92,
                "NSATTR": 99,
                "NGUID": 104,
                "EUI64": 120,
                "LBAF": 128,
                "VS": 384,
            },
        ),
        (
            SmartLog,
            512,
            {
                "COMPOSITE_TEMPERATURE": 1,
                "PERCENTAGE_USED": 5,
                "DATA_UNITS_READ": 32,
                "HOST_WRITE_COMMANDS": 80,
                "POWER_ON_HOURS": 128,
                "NUM_ERR_LOG_ENTRIES": 176,
                "WARNING_TEMP_TIME": 192,
                "TEMP_SENSOR": 200,
                "TMT1_TRANSITION_COUNT": 216,
                "TMT2_TOTAL_TIME": 228,
            },
        ),
        (ErrorLogEntry, 64, {"SQID": 8, "CID": 10, "STATUS": 12, "LBA": 16, "NSID": 24, "CSI": 32}),
    ],
)
def test_sizes_and_offsets_are_the_specifications(
    struct_: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    assert ctypes.sizeof(struct_) == size
    for name, offset in offsets.items():
        assert getattr(struct_, name).offset == offset, name


def test_register_bit_fields() -> None:
    cap = CAP.from_value(0x004018200F0107FF)  # QEMU 7.2's NVMe controller
    assert (cap.MQES, cap.CQR, cap.AMS, cap.TO, cap.DSTRD) == (2047, 1, 0, 15, 0)
    assert (cap.CSS & 1, cap.MPSMIN, cap.MPSMAX) == (1, 0, 4)
    cc = CC(EN=1, IOSQES=6, IOCQES=4)
    assert cc.value == 0x00460001
    cc.SHN = 0b01
    assert cc.value == 0x00464001
    assert CC.from_value(0x00464001).SHN == 1
    assert AQA(ASQS=31, ACQS=31).value == 0x001F001F
    csts = CSTS.from_value(0b1011)
    assert (csts.RDY, csts.CFS, csts.SHST) == (1, 1, 0b10)
    vs = VS.from_value(0x00010400)
    assert (vs.MJR, vs.MNR, vs.TER) == (1, 4, 0)


def test_the_packed_sqe_is_the_structure() -> None:
    raw = bytearray(64)
    struct.pack_into(
        SQE_FORMAT, raw, 0, 0x02 | (0x1234 << 16), 1, 0, 0, 0xA000, 0xB000, 7, 8, 9, 0, 0, 0
    )
    s = SQE.from_buffer(raw)
    assert (s.OPC, s.CID, s.NSID, s.PRP1, s.PRP2) == (0x02, 0x1234, 1, 0xA000, 0xB000)
    assert (s.CDW10, s.CDW11, s.CDW12, s.CDW13) == (7, 8, 9, 0)


def test_cqe_dw3_as_the_driver_reads_it() -> None:
    raw = bytearray(16)
    status = (1 << 8) | 0x02  # SCT 1, SC 02h: Invalid Queue Size
    struct.pack_into("<IIHHHH", raw, 0, 0xDEAD, 0, 5, 1, 0x77, (status << 1) | 1)
    cqe = CQE.from_buffer(raw)
    dw3 = struct.unpack_from("<I", raw, 12)[0]
    assert cqe.CID == dw3 & 0xFFFF == 0x77
    assert cqe.STATUS_P & 1 == (dw3 >> 16) & 1 == 1  # phase tag
    assert cqe.STATUS_P >> 1 == dw3 >> 17 == status
    assert (cqe.DW0, cqe.SQHD, cqe.SQID) == (0xDEAD, 5, 1)


def test_lba_format_in_use() -> None:
    ns = IdentifyNamespace()
    ns.NLBAF = 1
    ns.LBAF[0].LBADS = 9
    ns.LBAF[1].LBADS = 12
    ns.FLBAS = 1
    assert ns.lba_format.LBADS == 12
    ns.FLBAS = 0
    assert ns.lba_format.LBADS == 9
