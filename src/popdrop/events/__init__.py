"""Events: venue, activation window, time slots, pickup lanes and windows, partners, staff."""
