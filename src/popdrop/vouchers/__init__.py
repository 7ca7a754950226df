"""The voucher vault: batches, single-use codes, links, redemption, revocation."""
