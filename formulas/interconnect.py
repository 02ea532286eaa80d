"""Interconnects: each GPU's bandwidth to its node's GPUs, to its host, and its node's to other nodes.

Every figure is a datasheet's, in GB/s (10**9 bytes per second) **per direction**: the datasheets quote
NVLink and PCIe as bidirectional totals, halved here, and node networks as NICs × line rate in Gb/s,
divided by 8. These are peak rates; what NCCL achieves as bus bandwidth is lower, and the planner's step-time
model (`formulas.plan`) uses them as they are and says so. A system without a vendor reference design (PCIe
cards in a server of the buyer's choice) has its node network stated as an assumption, which
`tmath plan --inter-node-gbps` replaces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interconnect:
    """One GPU's links, per direction."""

    intra_node_gbps: float
    """GB/s from one GPU to the others of its node (NVLink/NVSwitch, Infinity Fabric, or PCIe without them)."""
    intra_node_kind: str
    pcie_gbps: float
    """GB/s between the GPU and its host (offload traffic)."""
    node_network_gbps: float
    """GB/s out of one node to the others, all its NICs together (shared by its GPUs)."""
    node_network_kind: str
    source: str
    assumed: bool = False
    """The node network is an assumption, not a reference design's datasheet."""


_DGX_A100 = "https://images.nvidia.com/aem-dam/Solutions/Data-Center/nvidia-dgx-a100-datasheet.pdf"
_DGX_H100 = "https://resources.nvidia.com/en-us-dgx-systems/ai-enterprise-dgx"
_A100 = Interconnect(300.0, "NVLink 3 (600 GB/s bidirectional)", 32.0, 200.0, "8 × 200 Gb/s HDR InfiniBand (DGX A100)",
                     f"A100 datasheet (NVLink 600 GB/s, PCIe Gen4 64 GB/s); {_DGX_A100}")  # fmt: skip
_HOPPER_SXM = Interconnect(450.0, "NVLink 4 (900 GB/s bidirectional)", 64.0, 400.0,
                           "8 × 400 Gb/s NDR InfiniBand (DGX H100 / HGX H200)",
                           f"H100/H200 datasheets (NVLink 900 GB/s, PCIe Gen5 128 GB/s); {_DGX_H100}")  # fmt: skip
_PCIE4 = "PCIe Gen4 x16 (64 GB/s bidirectional)"

INTERCONNECTS: dict[str, Interconnect] = {
    "a100-40gb": _A100,
    "a100-80gb": _A100,
    "h100-sxm": _HOPPER_SXM,
    "h200": _HOPPER_SXM,
    "h100-pcie": Interconnect(
        64.0,
        "PCIe Gen5 x16 (128 GB/s bidirectional; the NVLink bridge joins pairs only)",
        64.0,
        200.0,
        "assumed: 4 × 400 Gb/s per 8-GPU server",
        "H100 PCIe datasheet (PCIe Gen5 128 GB/s)",
        assumed=True,
    ),
    "v100": Interconnect(
        150.0,
        "NVLink 2 (300 GB/s bidirectional)",
        16.0,
        50.0,
        "4 × 100 Gb/s EDR InfiniBand (DGX-1)",
        "V100 datasheet (NVLink 300 GB/s, PCIe Gen3 32 GB/s); DGX-1 datasheet",
    ),
    "a10g": Interconnect(
        32.0,
        _PCIE4,
        32.0,
        12.5,
        "100 Gb/s ENA (AWS g5.48xlarge)",
        "AWS EC2 G5 instance page (100 Gbps networking); A10G PCIe Gen4",
    ),
    "l40s": Interconnect(
        32.0, _PCIE4, 32.0, 50.0, "assumed: 400 Gb/s per 8-GPU server", "L40S datasheet (PCIe Gen4 x16)", assumed=True
    ),
    "l4": Interconnect(
        32.0,
        _PCIE4,
        32.0,
        12.5,
        "100 Gb/s ENA (AWS g6.48xlarge)",
        "L4 datasheet (PCIe Gen4 x16); AWS EC2 G6 instance page (100 Gbps)",
    ),
    "rtx-4090": Interconnect(
        32.0,
        _PCIE4 + ", no NVLink",
        32.0,
        12.5,
        "assumed: 100 Gb/s Ethernet",
        "Ada whitepaper (PCIe Gen4 x16)",
        assumed=True,
    ),
    "mi250x": Interconnect(
        400.0,
        "Infinity Fabric (800 GB/s aggregate, bidirectional)",
        32.0,
        100.0,
        "4 × 200 Gb/s Slingshot per 4-GPU node (Frontier)",
        "AMD MI250X page (Infinity Fabric 800 GB/s, PCIe Gen4); OLCF Frontier user guide",
    ),
    "mi300x": Interconnect(
        448.0,
        "Infinity Fabric (896 GB/s aggregate: 7 × 128 GB/s, bidirectional)",
        64.0,
        400.0,
        "8 × 400 Gb/s per 8-GPU platform (AMD Instinct MI300X platform)",
        "AMD MI300X datasheet (Infinity Fabric 896 GB/s, PCIe Gen5 128 GB/s)",
    ),
}


def interconnect(gpu_name: str) -> Interconnect:
    """The links of a GPU by its `--gpu` key (`formulas.hardware.GPUS`)."""
    if gpu_name not in INTERCONNECTS:
        raise ValueError(f"no interconnect figures for GPU {gpu_name!r}")
    return INTERCONNECTS[gpu_name]
