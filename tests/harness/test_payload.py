import pytest
import torch

from harness.core.bits import (BitPacker, pack_bits, packed_nbytes, store_zeros, unpack_bits,
                               zero_storage_nbytes)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 8, 1001])
def test_pack_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n),
                          dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_end_first():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([True, False, True]), 1).tolist() == [0b101]


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="2 bits"):
        pack_bits(torch.tensor([4]), 2)


def test_zero_storage_picks_the_smaller_form():
    assert zero_storage_nbytes(800, 0) == 0
    assert zero_storage_nbytes(800, 3) == 12       # positions: 12 < 100
    assert zero_storage_nbytes(800, 500) == 100    # mask
    mask = torch.zeros(800, dtype=torch.bool)
    mask[[5, 9]] = True
    stored, form = store_zeros(mask)
    assert form == "positions" and stored.tolist() == [5, 9]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packer_in_blocks_gives_the_bytes_of_one_pack(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=g)
    packer = BitPacker(codes.numel(), bits)
    for block in torch.split(codes, [3, 0, 250, 5, 743]):
        packer.add(block)
    assert torch.equal(packer.finish(), pack_bits(codes, bits))
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 1001), codes.to(torch.uint8))


def test_bit_packer_refuses_more_codes_than_allotted():
    packer = BitPacker(8, 1)
    packer.add(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="more codes"):
        packer.add(torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_on_a_device_gives_the_cpu_bytes(bits):
    """The CPU packs and unpacks through numpy; a device through shifts: same bytes, same
    codes."""
    from tests.emulated_device import CUDA, EmulatedDevice

    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    with EmulatedDevice() as device:
        on_device = codes.to(CUDA)
        device_packed = pack_bits(on_device, bits)
        assert device.on_device(device_packed)
        device_codes = unpack_bits(packed.to(CUDA), bits, 1001)
        assert device.on_device(device_codes)
        device_packed, device_codes = device_packed.cpu(), device_codes.cpu()
    assert torch.equal(device_packed, packed) and torch.equal(device_codes, codes)
