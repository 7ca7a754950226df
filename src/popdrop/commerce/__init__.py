"""Commerce: orders from holds, prices, payments, refunds, pickup at a lane, samples."""
