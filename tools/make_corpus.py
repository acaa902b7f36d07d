#!/usr/bin/env python3
"""Synthesize qswap's constrained-domain speech corpus and write a fairseq speech_to_text
data directory.

The domain is a small sentence grammar (smart-device commands, numbers, times, dates, names,
places; a few hundred words). Each utterance is spoken by one *voice configuration*: an engine
(espeak-ng, flite or festival), a voice of that engine, a speaking rate / pitch, and a light
sox perturbation (tempo, pitch, band limit, reverb) plus numpy noise and gain. One or more
voice configurations (engine+voice) are held out of train/dev/test entirely and only speak
``test_heldout``.

Output (``--out DIR``), in the layout of fairseq's ``examples/speech_to_text`` prep scripts:

    config.yaml                 speech_to_text data config (relative paths)
    gcmvn.npz                   global CMVN stats (mean, std) over the training features
    spm_unigram<V>.model/.txt   sentencepiece model and fairseq dictionary
    fbank80_<split>.zip         80-dim Kaldi fbank features, one .npy per utterance (ZIP_STORED)
    <split>.tsv                 id  audio  n_frames  tgt_text  speaker
    voices.json                 the voice configurations and which are held out

``audio`` in the manifests is ``fbank80_<split>.zip:<offset>:<length>``, relative to the data
directory (fairseq resolves it against the data root), so the directory can be moved.

The corpus is deterministic for a given ``--seed`` and sizes: the same sentences, the same
voices and the same perturbations (synthesis engines themselves are deterministic).

Needs the Debian packages espeak-ng, flite, sox (and optionally festival, festvox-kallpc16k,
festvox-kdlpc16k, festvox-us-slt-hts for the festival voices). ``--install-deps`` installs
them with apt-get.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qswap.features import fbank, load_audio  # noqa: E402
from tools.tool_cli import positive_int  # noqa: E402

SAMPLE_RATE = 16000
REQUIRED_TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "sox": "sox"}
FESTIVAL_PACKAGES = ["festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts"]
SPLITS = ("train", "dev", "test", "test_heldout")

# --------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORD_ONES = ["zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
            "sixteenth", "seventeenth", "eighteenth", "nineteenth"]
ORD_TENS = {20: "twentieth", 30: "thirtieth"}


def num(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("" if o == 0 else " " + ONES[o])
    if n == 100:
        return "one hundred"
    h, r = divmod(n, 100)
    return ONES[h] + " hundred" + ("" if r == 0 else " and " + num(r))


def ordinal(n: int) -> str:
    if n < 20:
        return ORD_ONES[n]
    if n in ORD_TENS:
        return ORD_TENS[n]
    t, o = divmod(n, 10)
    return TENS[t] + " " + ORD_ONES[o]


NAMES = ["anna", "john", "maria", "david", "sarah", "michael", "emma", "james", "olivia", "peter",
         "lucy", "thomas", "sophie", "daniel", "grace", "robert", "laura", "kevin", "julia", "mark",
         "alice", "george", "helen", "oscar", "nina", "victor", "rachel", "simon", "karen", "paul",
         "mom", "dad", "grandma", "grandpa", "the office", "the doctor", "my sister", "my brother"]
CITIES = ["paris", "london", "berlin", "tokyo", "new york", "madrid", "rome", "chicago", "boston",
          "seattle", "sydney", "toronto", "dublin", "vienna", "amsterdam", "lisbon", "prague",
          "oslo", "cairo", "mexico city", "san francisco", "los angeles", "miami", "denver",
          "atlanta", "moscow", "beijing", "singapore", "mumbai", "istanbul", "athens", "warsaw",
          "stockholm", "helsinki", "brussels", "zurich", "montreal", "vancouver", "dallas",
          "houston"]
PLACES = ["the airport", "the train station", "the nearest gas station", "the supermarket",
          "the hospital", "work", "home", "the gym", "the library", "the city center",
          "the beach", "the museum", "the pharmacy", "the post office", "the park", "school"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WHEN = ["today", "tomorrow", "tonight", "this weekend", "this afternoon", "this evening",
        "tomorrow morning", "next week"] + ["on " + d for d in DAYS] + ["next " + d for d in DAYS]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "hallway", "garage", "office",
         "dining room", "basement", "kids room", "guest room", "porch"]
SWITCHABLE = ["lights", "lamp", "fan", "heater", "air conditioner", "tv", "radio", "speaker",
              "ceiling light", "coffee machine", "humidifier", "floor lamp"]
APPLIANCES = ["dishwasher", "washing machine", "dryer", "oven", "coffee machine", "robot vacuum",
              "microwave", "kettle"]
OPENABLE = ["front door", "back door", "garage door", "windows", "blinds", "curtains", "gate"]
GENRES = ["jazz", "rock music", "classical music", "pop music", "the news", "some relaxing music",
          "my workout playlist", "country music", "the radio", "a podcast", "the blues",
          "hip hop", "piano music", "rain sounds", "my favorite songs", "something happy"]
TASKS = ["buy milk", "call the bank", "take my medicine", "water the plants", "feed the cat",
         "walk the dog", "pay the rent", "pick up the kids", "check the oven", "send the report",
         "book a flight", "clean the kitchen", "go to the gym", "charge my phone", "bring an umbrella",
         "stretch", "drink some water", "lock the door", "take out the trash", "call grandma"]
ITEMS = ["milk", "eggs", "bread", "apples", "coffee", "butter", "cheese", "rice", "bananas",
         "tomatoes", "chicken", "pasta", "orange juice", "sugar", "flour", "potatoes", "onions",
         "yogurt", "tea", "salt", "carrots", "lemons", "soap", "toothpaste", "paper towels",
         "batteries", "dog food", "ice cream", "olive oil", "cereal"]
MESSAGES = ["i am running late", "see you soon", "i will be home at six", "call me back",
            "happy birthday", "thank you", "i am on my way", "dinner is ready", "good night",
            "the meeting is cancelled", "where are you", "i love you", "let us meet at noon"]
UNITS = [("miles", "kilometers"), ("kilometers", "miles"), ("pounds", "kilograms"),
         ("kilograms", "pounds"), ("inches", "centimeters"), ("cups", "liters"),
         ("degrees fahrenheit", "celsius"), ("feet", "meters"), ("ounces", "grams")]
HOLIDAYS = ["christmas", "new year", "halloween", "easter", "my birthday", "the weekend",
            "summer vacation", "thanksgiving"]
DURATION_UNITS = ["minutes", "seconds", "hours"]


def duration(r: random.Random) -> str:
    u = r.choice(DURATION_UNITS + ["minutes", "minutes"])
    n = r.choice([r.randint(2, 59), r.choice([5, 10, 15, 20, 25, 30, 45])]) if u != "hours" else r.randint(2, 12)
    if r.random() < 0.12:
        return r.choice(["one minute", "one hour", "half an hour", "an hour and a half", "ninety seconds"])
    if r.random() < 0.12 and u == "minutes":
        return f"{num(r.randint(1, 3))} hours and {num(r.choice([10, 15, 20, 30, 45]))} minutes"
    return f"{num(n)} {u}"


def clock_time(r: random.Random) -> str:
    h = r.randint(1, 12)
    x = r.random()
    if x < 0.06:
        return r.choice(["noon", "midnight"])
    if x < 0.16:
        return f"half past {num(h)}"
    if x < 0.24:
        return f"quarter {r.choice(['past', 'to'])} {num(h)}"
    if x < 0.40:
        base = f"{num(h)} o'clock"
    else:
        m = r.choice([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55] + list(range(11, 60)))
        base = f"{num(h)} {'oh ' + num(m) if m < 10 else num(m)}"
    if x < 0.40 or r.random() < 0.75:
        base += " " + r.choice(["a m", "p m", "a m", "p m", "in the morning", "in the evening",
                                "in the afternoon", "at night"])
    return base


def date(r: random.Random) -> str:
    d = r.randint(1, 31 if r.random() < 0.9 else 28)
    m = r.choice(MONTHS)
    return r.choice([f"{m} {ordinal(d)}", f"the {ordinal(d)} of {m}"])


def when(r: random.Random) -> str:
    return r.choice(WHEN) if r.random() < 0.75 else "on " + date(r)


def _t(r: random.Random) -> str:  # noqa: C901 (a grammar is a big switch)
    k = r.randrange(32)
    c = r.choice
    if k == 0:
        return f"set a timer for {duration(r)}"
    if k == 1:
        return c([f"set an alarm for {clock_time(r)}", f"set an alarm for {clock_time(r)} {when(r)}",
                  f"wake me up at {clock_time(r)}", f"wake me up at {clock_time(r)} {when(r)}"])
    if k == 2:
        return c([f"remind me to {c(TASKS)} at {clock_time(r)}", f"remind me to {c(TASKS)} {when(r)}",
                  f"remind me to {c(TASKS)} in {duration(r)}"])
    if k == 3:
        return c([f"call {c(NAMES)}", f"call {c(NAMES)} at {clock_time(r)}", f"call {c(NAMES)} {when(r)}",
                  f"call {c(NAMES)} on speaker", f"video call {c(NAMES)}"])
    if k == 4:
        return c([f"send a message to {c(NAMES)} saying {c(MESSAGES)}", f"text {c(NAMES)} {c(MESSAGES)}",
                  f"tell {c(NAMES)} {c(MESSAGES)}"])
    if k == 5:
        return c([f"what is the weather in {c(CITIES)}", f"what is the weather in {c(CITIES)} {when(r)}",
                  f"what is the weather like {when(r)}", f"will it rain in {c(CITIES)} {when(r)}",
                  f"will it snow {when(r)}", f"how cold is it in {c(CITIES)}",
                  f"do i need an umbrella {when(r)}", f"what is the temperature in {c(CITIES)}"])
    if k in (6, 7):
        return c([f"turn {c(['on', 'off'])} the {c(ROOMS)} {c(SWITCHABLE)}",
                  f"switch {c(['on', 'off'])} the {c(SWITCHABLE)} in the {c(ROOMS)}",
                  f"turn the {c(ROOMS)} {c(SWITCHABLE)} {c(['on', 'off'])}",
                  f"turn {c(['on', 'off'])} all the lights", f"turn {c(['on', 'off'])} the {c(SWITCHABLE)}"])
    if k == 8:
        return c([f"set the {c(ROOMS)} temperature to {num(r.randint(15, 30))} degrees",
                  f"set the thermostat to {num(r.randint(60, 80))} degrees",
                  f"make it {c(['warmer', 'cooler'])} in the {c(ROOMS)}",
                  f"what is the temperature in the {c(ROOMS)}"])
    if k == 9:
        return c([f"dim the {c(ROOMS)} lights to {num(r.randrange(5, 100, 5))} percent",
                  f"set the brightness to {num(r.randrange(5, 101, 5))} percent",
                  f"set the volume to {num(r.randint(1, 10))}",
                  f"set the volume to {num(r.randrange(5, 101, 5))} percent",
                  f"change the {c(ROOMS)} lights to {c(['red', 'blue', 'green', 'warm white', 'yellow', 'purple', 'orange'])}"])
    if k in (10, 11):
        return c([f"play {c(GENRES)}", f"play {c(GENRES)} in the {c(ROOMS)}",
                  f"play {c(GENRES)} for {duration(r)}", f"can you play {c(GENRES)}",
                  c(["pause the music", "skip this song", "stop the music", "play the next song",
                     "turn the volume up", "turn the volume down", "resume playback", "mute the speaker",
                     "what song is this", "play it again", "shuffle my music", "go back to the previous song"])])
    if k == 12:
        return c([f"add {c(ITEMS)} to my shopping list", f"add {c(ITEMS)} and {c(ITEMS)} to the shopping list",
                  f"remove {c(ITEMS)} from my shopping list", "what is on my shopping list",
                  f"do we need {c(ITEMS)}", f"order more {c(ITEMS)}"])
    if k == 13:
        return c([f"what time is it in {c(CITIES)}", "what time is it", f"what is the time in {c(CITIES)}",
                  "what day is it today", "what is the date today", f"what day is {date(r)}"])
    if k == 14:
        return c([f"how long does it take to get to {c(CITIES)}", f"navigate to {c(PLACES)}",
                  f"how far is {c(PLACES)}", f"take me to {c(PLACES)}", f"how is the traffic to {c(PLACES)}",
                  f"find a flight to {c(CITIES)} {when(r)}", f"book a train to {c(CITIES)} {when(r)}"])
    if k == 15:
        return c([f"book a table for {num(r.randint(2, 12))} at {clock_time(r)}",
                  f"book a table for {num(r.randint(2, 12))} {when(r)} at {clock_time(r)}",
                  f"order a pizza for {clock_time(r)}", f"order a taxi to {c(PLACES)} at {clock_time(r)}"])
    if k == 16:
        return c([f"schedule a meeting with {c(NAMES)} on {date(r)} at {clock_time(r)}",
                  f"schedule a meeting with {c(NAMES)} {when(r)}",
                  f"move my meeting with {c(NAMES)} to {clock_time(r)}",
                  f"cancel my meeting with {c(NAMES)}", f"what is on my calendar {when(r)}",
                  f"am i free {when(r)} at {clock_time(r)}"])
    if k == 17:
        return c([f"{c(['lock', 'unlock'])} the {c(['front door', 'back door', 'garage door', 'gate'])}",
                  f"{c(['open', 'close'])} the {c(OPENABLE)}", f"{c(['open', 'close'])} the {c(ROOMS)} {c(['windows', 'blinds', 'curtains'])}",
                  f"is the {c(OPENABLE)} {c(['open', 'closed', 'locked'])}"])
    if k == 18:
        op = c(["plus", "minus", "times", "divided by"])
        return c([f"what is {num(r.randint(1, 99))} {op} {num(r.randint(1, 20))}",
                  f"how much is {num(r.randint(1, 99))} {op} {num(r.randint(1, 20))}",
                  f"what is {num(r.randint(5, 50))} percent of {num(r.randrange(10, 101, 10))}"])
    if k == 19:
        return c([f"how many days until {c(HOLIDAYS)}", f"how many days until {date(r)}",
                  f"when is {c(HOLIDAYS)}", f"how many weeks until {c(HOLIDAYS)}"])
    if k == 20:
        a, b = c(UNITS)
        return c([f"convert {num(r.randint(1, 99))} {a} to {b}", f"how many {b} is {num(r.randint(1, 99))} {a}"])
    if k == 21:
        return c([f"start the {c(APPLIANCES)}", f"stop the {c(APPLIANCES)}",
                  f"start the {c(APPLIANCES)} at {clock_time(r)}", f"is the {c(APPLIANCES)} finished",
                  f"preheat the oven to {num(r.randrange(150, 260, 10))} degrees",
                  f"start the {c(APPLIANCES)} in {duration(r)}"])
    if k == 22:
        return c(["read my messages", f"read my messages from {c(NAMES)}", f"any new emails from {c(NAMES)}",
                  "do i have any new messages", f"reply to {c(NAMES)} saying {c(MESSAGES)}",
                  "check my email", f"when did {c(NAMES)} call"])
    if k == 23:
        return c([f"set a reminder for {date(r)} to {c(TASKS)}", f"set a reminder for {when(r)} to {c(TASKS)}",
                  f"remind me {when(r)} at {clock_time(r)} to {c(TASKS)}"])
    if k == 24:
        return c([f"what is the news in {c(CITIES)}", "what are the headlines today",
                  f"tell me a {c(['joke', 'story', 'fun fact'])}", f"how do you spell {c(CITIES)}",
                  f"who is calling", f"find my {c(['phone', 'keys', 'wallet', 'glasses', 'headphones'])}"])
    if k == 25:
        return c([f"set the {c(ROOMS)} fan to {c(['low', 'medium', 'high'])}",
                  f"set the air conditioner to {num(r.randint(16, 28))} degrees",
                  f"turn on the heating in the {c(ROOMS)}", f"turn off the heating at {clock_time(r)}",
                  f"turn {c(['on', 'off'])} the {c(SWITCHABLE)} at {clock_time(r)}"])
    if k == 26:
        return c([f"what is the score of the {c(CITIES)} game", f"when does the {c(CITIES)} game start",
                  f"when does {c(['the bank', 'the pharmacy', 'the supermarket', 'the library', 'the museum'])} {c(['open', 'close'])} {when(r)}",
                  f"find a {c(['restaurant', 'coffee shop', 'hotel', 'pharmacy', 'gas station', 'bakery'])} near {c(PLACES)}"])
    if k == 27:
        return c([f"set a timer for {duration(r)} called {c(['pasta', 'eggs', 'laundry', 'tea', 'cake', 'homework', 'bread'])}",
                  f"how much time is left on the {c(['pasta', 'eggs', 'laundry', 'tea', 'cake'])} timer",
                  "cancel the timer", "cancel all alarms", f"snooze for {duration(r)}",
                  f"delete the alarm for {clock_time(r)}"])
    if k == 28:
        return c([f"what is the forecast for {c(DAYS)}", f"what is the forecast for {c(CITIES)} on {c(DAYS)}",
                  f"is it going to be sunny in {c(CITIES)} {when(r)}", f"when is sunset in {c(CITIES)}",
                  f"when does the sun rise {when(r)}"])
    if k == 29:
        return c([f"call {c(NAMES)} and tell them {c(MESSAGES)}", f"share my location with {c(NAMES)}",
                  f"send {c(NAMES)} {num(r.randint(5, 99))} dollars", f"what is {c(NAMES)}s phone number"])
    if k == 30:
        return c([f"record a show {when(r)} at {clock_time(r)}", f"turn on channel {num(r.randint(1, 99))}",
                  f"watch the news in the {c(ROOMS)}", f"turn the tv to channel {num(r.randint(1, 99))}"])
    return c([f"good {c(['morning', 'night', 'evening', 'afternoon'])}", "what can you do", "stop",
              "never mind", "thank you", "help", "cancel that", "yes please", "no thanks", "repeat that",
              f"i am leaving for {c(PLACES)}", f"i will be back at {clock_time(r)}"])


def sentence(r: random.Random) -> str:
    s = _t(r)
    return " ".join(s.split())


def grammar_vocabulary(n_samples: int = 200000, seed: int = 0) -> List[str]:
    r = random.Random(seed)
    words = set()
    for _ in range(n_samples):
        words.update(sentence(r).split())
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc",
                  "en-gb-x-gbclan", "en-029"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                   "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Gene", "Hugo", "Jacky",
                   "Lee", "Michael", "Mike", "Storm", "Tweaky", "adam", "anika", "aunty", "belinda",
                   "benjamin", "boris", "caleb", "david", "ed", "edward", "iven", "john", "klatt",
                   "klatt2", "klatt3", "klatt4", "linda", "max", "norbert", "pablo", "paul", "quincy",
                   "rob", "robert", "shelby", "steph", "travis", "victor", "grandma", "grandpa"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone",
                   "slt_hts": "voice_cmu_us_slt_arctic_hts"}

# Held out of train/dev/test entirely: an engine+voice never seen in training.
HELDOUT = [("flite", "rms"), ("espeak-ng", "en-029+Annie")]
HELDOUT_ESPEAK_ACCENTS = {"en-029"}
HELDOUT_ESPEAK_VARIANTS = {"Annie"}
# The large held-out set (--eval-large) adds a third voice that is held out by the same rule:
# espeak-ng's "Annie" variant (its voice) never spoke in training, here with the en-us accent.
HELDOUT_LARGE = HELDOUT + [("espeak-ng", "en-us+Annie")]
LARGE_SPLITS = ("test_large", "test_heldout_large")
# the shipped model's corpus (asset README): its sentences are kept out of the large eval sets
BASE_NUM = {"train": 7000, "dev": 200, "test": 100, "test_heldout": 100}


@dataclass
class VoiceConfig:
    engine: str
    voice: str
    rate: float = 1.0        # engine speaking-rate factor (espeak -s, flite/festival duration)
    pitch: int = 50          # espeak -p
    tempo: float = 1.0       # sox tempo
    semitones: float = 0.0   # sox pitch shift
    lowpass: int = 0         # sox lowpass cutoff (0 = none)
    reverb: int = 0          # sox reverb amount (0 = none)
    snr_db: float = 0.0      # additive white noise SNR (0 = none)
    gain: float = 1.0

    @property
    def speaker(self) -> str:
        return f"{self.engine}:{self.voice}"


def available_voices() -> Dict[str, List[str]]:
    """Engine -> voices usable on this machine (for train/dev/test and held-out)."""
    voices: Dict[str, List[str]] = {}
    if shutil.which("espeak-ng"):
        files = set()
        for d in ("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v",
                  "/usr/lib/aarch64-linux-gnu/espeak-ng-data/voices/!v",
                  "/usr/share/espeak-ng-data/voices/!v"):
            if Path(d).is_dir():
                files.update(p.name for p in Path(d).iterdir())
        variants = [v for v in ESPEAK_VARIANTS if v in files] or ["m1", "m3", "f1", "f3"]
        voices["espeak-ng"] = [f"{a}+{v}" for a in ESPEAK_ACCENTS for v in variants]
    if shutil.which("flite"):
        out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
        have = set(out.replace("Voices available:", "").split())
        voices["flite"] = [v for v in FLITE_VOICES if v in have]
    if shutil.which("text2wave"):
        fv = []
        for name, fn in FESTIVAL_VOICES.items():
            vdir = {"kal": "kal_diphone", "ked": "ked_diphone", "slt_hts": "cmu_us_slt_arctic_hts"}[name]
            if list(Path("/usr/share/festival/voices").glob(f"*/{vdir}")):
                fv.append(name)
        if fv:
            voices["festival"] = fv
    return voices


def is_heldout(engine: str, voice: str) -> bool:
    if (engine, voice) in HELDOUT:
        return True
    if engine == "espeak-ng":
        accent, _, variant = voice.partition("+")
        return accent in HELDOUT_ESPEAK_ACCENTS or variant in HELDOUT_ESPEAK_VARIANTS
    return False


ENGINE_WEIGHTS = {"espeak-ng": 0.5, "flite": 0.32, "festival": 0.18}


def sample_voice(r: random.Random, voices: Dict[str, List[str]], heldout: bool,
                 heldout_pool: Sequence[Tuple[str, str]] = tuple(HELDOUT)) -> VoiceConfig:
    if heldout:
        pool = [(e, v) for (e, v) in heldout_pool if v in voices.get(e, []) or
                (e == "espeak-ng" and "espeak-ng" in voices)]
        engine, voice = r.choice(pool)
    else:
        engines = [e for e in ENGINE_WEIGHTS if voices.get(e)]
        weights = [ENGINE_WEIGHTS[e] for e in engines]
        engine = r.choices(engines, weights)[0]
        cands = [v for v in voices[engine] if not is_heldout(engine, v)]
        voice = r.choice(cands)
    vc = VoiceConfig(engine, voice)
    vc.rate = round(r.uniform(0.8, 1.25), 3)
    vc.pitch = r.randint(25, 75)
    vc.tempo = round(r.uniform(0.9, 1.1), 3) if r.random() < 0.4 else 1.0
    vc.semitones = round(r.uniform(-2.5, 2.5), 2) if r.random() < 0.35 else 0.0
    vc.lowpass = r.choice([3400, 4000, 5000, 6000]) if r.random() < 0.15 else 0
    vc.reverb = r.randint(10, 50) if r.random() < 0.15 else 0
    vc.snr_db = round(r.uniform(12, 40), 1) if r.random() < 0.5 else 0.0
    vc.gain = round(10 ** (r.uniform(-12, 0) / 20), 4)
    return vc


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], **kw) -> None:
    p = subprocess.run(list(cmd), capture_output=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')[-500:]}")


def synth_raw(text: str, vc: VoiceConfig, out_wav: str) -> None:
    """Synthesize ``text`` with the engine into ``out_wav`` (any rate)."""
    if vc.engine == "espeak-ng":
        wpm = int(round(165 * vc.rate))
        _run(["espeak-ng", "-v", vc.voice, "-s", str(wpm), "-p", str(vc.pitch), "-w", out_wav, text])
    elif vc.engine == "flite":
        _run(["flite", "-voice", vc.voice, "--setf", f"duration_stretch={1.0 / vc.rate:.3f}",
              "-t", text, "-o", out_wav])
    elif vc.engine == "festival":
        raise RuntimeError("festival utterances are synthesized in batches")
    else:
        raise ValueError(vc.engine)


def festival_batch(items: List[Tuple[str, VoiceConfig, str]]) -> None:
    """Synthesize many (text, voice, out_wav) with one festival process per voice."""
    by_voice: Dict[str, List[Tuple[str, VoiceConfig, str]]] = {}
    for it in items:
        by_voice.setdefault(it[1].voice, []).append(it)
    for voice, its in by_voice.items():
        lines = [f"({FESTIVAL_VOICES[voice]})"]
        for text, vc, wav in its:
            t = text.replace('"', "")
            lines.append(f"(Parameter.set 'Duration_Stretch {1.0 / vc.rate:.3f})")
            lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{t}")) "{wav}" \'riff)')
        with tempfile.NamedTemporaryFile("w", suffix=".scm", delete=False) as f:
            f.write("\n".join(lines) + "\n")
            scm = f.name
        try:
            _run(["festival", "-b", scm])
        finally:
            os.unlink(scm)


def postprocess(raw_wav: str, vc: VoiceConfig, seed: int) -> np.ndarray:
    """sox: 16 kHz mono 16-bit + tempo/pitch/lowpass/reverb; numpy: gain + white noise."""
    fd, tmp = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        cmd = ["sox", "-q", "-R", "-D", raw_wav,  # -R -D: repeatable, no dither
               "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", tmp]
        effects: List[str] = ["rate", str(SAMPLE_RATE)]  # first: some voices are 8 kHz
        if vc.semitones:
            effects += ["pitch", str(int(round(vc.semitones * 100)))]
        if vc.tempo != 1.0:
            effects += ["tempo", "-s", str(vc.tempo)]
        if vc.lowpass:
            effects += ["lowpass", str(vc.lowpass)]
        if vc.reverb:
            effects += ["reverb", str(vc.reverb)]
        effects += ["norm", "-3", "rate", str(SAMPLE_RATE)]  # pitch/tempo keep the rate
        _run(cmd + effects)
        wav, sr = load_audio(tmp, expected_sample_rate=SAMPLE_RATE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    x = wav.numpy().astype(np.float64) * vc.gain
    rng = np.random.default_rng(seed)
    # a little leading/trailing silence so utterance edges vary
    pre, post = rng.integers(0, int(0.25 * SAMPLE_RATE), size=2)
    x = np.concatenate([np.zeros(pre), x, np.zeros(post)])
    if vc.snr_db:
        p = np.mean(x ** 2) + 1e-12
        x = x + rng.normal(0.0, np.sqrt(p / 10 ** (vc.snr_db / 10)), size=x.shape)
    else:
        x = x + rng.normal(0.0, 1e-4, size=x.shape)  # keep log-mel finite in digital silence
    return np.clip(x, -1.0, 1.0).astype(np.float32)


@dataclass
class Utt:
    uid: str
    split: str
    text: str
    voice: VoiceConfig
    seed: int


def _process_chunk(args: Tuple[List[Utt], str, bool]) -> List[Tuple[str, bytes, int]]:
    """Synthesize and featurize a chunk; returns (uid, npy_bytes, n_frames)."""
    utts, tmpdir, fp16 = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    raw = {u.uid: os.path.join(tmpdir, f"{u.uid}.raw.wav") for u in utts}
    fest = [(u.text, u.voice, raw[u.uid]) for u in utts if u.voice.engine == "festival"]
    if fest:
        festival_batch(fest)
    out = []
    for u in utts:
        if u.voice.engine != "festival":
            synth_raw(u.text, u.voice, raw[u.uid])
        x = postprocess(raw[u.uid], u.voice, u.seed)
        os.unlink(raw[u.uid])
        feats = fbank(x, SAMPLE_RATE).numpy()
        feats = feats.astype(np.float16 if fp16 else np.float32)
        buf = io.BytesIO()
        np.save(buf, feats)
        out.append((u.uid, buf.getvalue(), int(feats.shape[0])))
    return out


# --------------------------------------------------------------------------------------------
# Corpus plan
# --------------------------------------------------------------------------------------------
def plan(num: Dict[str, int], seed: int, voices: Dict[str, List[str]]) -> List[Utt]:
    r = random.Random(seed)
    seen = set()
    utts: List[Utt] = []
    # eval sentences first, all distinct and never in train
    order = ["test_heldout", "test", "dev", "train"]
    for split in order:
        for i in range(num[split]):
            for _ in range(1000):
                s = sentence(r)
                if split == "train" or s not in seen:
                    break
            if split != "train":
                seen.add(s)
            else:
                while s in seen:  # keep eval sentences out of train
                    s = sentence(r)
            vc = sample_voice(r, voices, heldout=(split == "test_heldout"))
            uid = f"{split}_{i:06d}"
            utts.append(Utt(uid, split, s, vc, seed * 1000003 + len(utts)))
    return utts


def plan_eval_large(num_test: int, num_heldout: int, seed: int, voices: Dict[str, List[str]],
                    base: Dict[str, int]) -> List[Utt]:
    """Large evaluation sets: sentences never in the ``base`` corpus of the same seed (train, dev,
    test and test_heldout of the shipped model's corpus) and distinct from each other; in-voice
    utterances from the training voices, held-out ones from HELDOUT_LARGE's voices."""
    planned = plan(base, seed, voices)
    check_planned_as_shipped(planned, seed)
    seen = {u.text for u in planned}
    r = random.Random(seed * 7919 + 17)
    utts: List[Utt] = []
    for split, n in (("test_heldout_large", num_heldout), ("test_large", num_test)):
        for i in range(n):
            for _ in range(10000):
                s = sentence(r)
                if s not in seen:
                    break
            else:
                sys.exit(f"make_corpus: the grammar gave no new sentence in 10000 tries ({split} {i})")
            seen.add(s)
            vc = sample_voice(r, voices, heldout=(split == "test_heldout_large"), heldout_pool=HELDOUT_LARGE)
            utts.append(Utt(f"{split}_{i:06d}", split, s, vc, seed * 1000003 + 500000 + len(utts)))
    return utts


SHIPPED_SEED = 1  # the shipped model's corpus
SHIPPED_ASSET = REPO / "qswap" / "assets" / "s2t_demo"


def check_planned_as_shipped(planned: List[Utt], seed: int) -> None:
    """Exit unless the shipped model's corpus, planned again here, has the shipped test sets'
    sentences. plan() draws sentences and voices from one generator, so another voice inventory
    (no festival, other espeak-ng voices) gives other sentences: the large sets would then keep out
    sentences the shipped model never saw and let in ones it trained on."""
    if seed != SHIPPED_SEED:
        return
    import csv

    for split in ("test", "test_heldout"):
        manifest = SHIPPED_ASSET / f"{split}.tsv"
        if not manifest.exists():
            continue
        with manifest.open(newline="", encoding="utf-8") as f:
            shipped = sorted(row["tgt_text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if sorted(u.text for u in planned if u.split == split) != shipped:
            sys.exit(f"make_corpus: the shipped model's corpus (--seed {seed}) planned with this machine's voices "
                     f"does not give {manifest}'s sentences: its voice inventory differs from the one the corpus "
                     f"was built with (festival's voices: {' '.join(FESTIVAL_PACKAGES)}), so the large sets could "
                     f"hold training sentences; install them (--install-deps) and drop --no-festival")


def check_deps(install: bool) -> None:
    missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing and install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing, *FESTIVAL_PACKAGES], check=True, env=env)
        missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        sys.exit(
            "make_corpus: missing synthesis tools; install the Debian packages: "
            f"apt-get install {' '.join(missing)}  (optional festival voices: {' '.join(FESTIVAL_PACKAGES)}), "
            "or rerun with --install-deps"
        )


def train_spm(texts: List[str], out: Path, vocab_size: int, seed: int) -> str:
    import sentencepiece as spm

    prefix = out / f"spm_unigram{vocab_size}"
    txt = out / "spm_train.txt"
    txt.write_text("\n".join(texts) + "\n")
    # single-threaded and unshuffled: the model depends only on the (seeded) sentences
    spm.SentencePieceTrainer.train(
        input=str(txt), model_prefix=str(prefix), model_type="unigram", vocab_size=vocab_size,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
        unk_id=3, bos_id=0, pad_id=1, eos_id=2, minloglevel=2,
    )
    txt.unlink()
    # fairseq dictionary: every piece except the 4 specials, with a dummy count
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    with open(str(prefix) + ".txt", "w") as f:
        for p in pieces:
            if p in ("<unk>", "<s>", "</s>", "<pad>"):
                continue
            f.write(f"{p} 1\n")
    return prefix.name


def write_config(out: Path, spm_prefix: str, cmvn: str = "utterance", specaugment: bool = True) -> None:
    """fairseq speech_to_text config.yaml.

    ``cmvn="utterance"`` (default, relocatable): fairseq's ``utterance_cmvn`` transform.
    ``cmvn="global"``: fairseq's ``global_cmvn`` with ``gcmvn.npz``. fairseq 0.12's GlobalCMVN
    calls ``np.load(stats_npz_path)`` relative to the *current working directory* (data_cfg
    does not resolve it against the data root), so the path is written absolute and the data
    directory is then not relocatable.
    """
    import yaml

    cfg = {
        "input_channels": 1,
        "input_feat_per_channel": 80,
        "vocab_filename": f"{spm_prefix}.txt",
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": f"{spm_prefix}.model"},
    }
    if cmvn == "global":
        cfg["global_cmvn"] = {"stats_npz_path": str((out / "gcmvn.npz").resolve())}
    base = [f"{cmvn}_cmvn"]
    cfg["transforms"] = {"*": list(base), "_train": list(base)}
    if specaugment:
        cfg["specaugment"] = {"freq_mask_F": 15, "freq_mask_N": 2, "time_mask_N": 2,
                              "time_mask_T": 20, "time_mask_p": 0.2, "time_wrap_W": 0}
        cfg["transforms"]["_train"] = base + ["specaugment"]
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def write_features(utts: List[Utt], out: Path, splits: Sequence[str], args, t0: float) -> Dict[str, Tuple[bytes, int]]:
    """Synthesize, featurize and write ``fbank80_<split>.zip`` and ``<split>.tsv`` per split."""
    chunks = [utts[i:i + args.chunk] for i in range(0, len(utts), args.chunk)]
    results: Dict[str, Tuple[bytes, int]] = {}
    with tempfile.TemporaryDirectory(prefix="qswap_corpus_") as tmpdir:
        work = [(c, tmpdir, args.fp16_features) for c in chunks]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as ex:
                for k, res in enumerate(ex.map(_process_chunk, work)):
                    results.update({uid: (b, n) for uid, b, n in res})
                    if (k + 1) % 20 == 0:
                        print(f"  {len(results)}/{len(utts)} utterances, {time.time() - t0:.0f}s", flush=True)
        else:
            for c in work:
                results.update({uid: (b, n) for uid, b, n in _process_chunk(c)})

    # zips + manifests
    for split in splits:
        su = [u for u in utts if u.split == split]
        if not su:
            continue
        zname = f"fbank80_{split}.zip"
        with zipfile.ZipFile(out / zname, "w", zipfile.ZIP_STORED) as zf:
            for u in su:  # fixed timestamps: byte-identical zips for the same seed
                zi = zipfile.ZipInfo(f"{u.uid}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                zi.compress_type = zipfile.ZIP_STORED
                zf.writestr(zi, results[u.uid][0])
        rows = []
        with zipfile.ZipFile(out / zname) as zf:
            for info in zf.infolist():
                off = info.header_offset + 30 + len(info.filename.encode())
                rows.append((info.filename[:-4], f"{zname}:{off}:{info.file_size}"))
        loc = dict(rows)
        with open(out / f"{split}.tsv", "w") as f:
            f.write("id\taudio\tn_frames\ttgt_text\tspeaker\n")
            for u in su:
                f.write(f"{u.uid}\t{loc[u.uid]}\t{results[u.uid][1]}\t{u.text}\t{u.voice.speaker}\n")

    return results


def write_voices(out: Path, args, num: Dict[str, int], voices: Dict[str, List[str]], utts: List[Utt],
                 heldout: Sequence[Tuple[str, str]], t0: float) -> None:
    meta = {
        "seed": args.seed, "num": num, "vocab_size": args.vocab_size,
        "heldout": [f"{e}:{v}" for e, v in heldout],
        "heldout_rule": {"espeak_accents": sorted(HELDOUT_ESPEAK_ACCENTS),
                         "espeak_variants": sorted(HELDOUT_ESPEAK_VARIANTS)},
        "voices_available": voices,
        "grammar_words": len(grammar_vocabulary(50000, args.seed)),
        "utterances": [{"id": u.uid, "split": u.split, "text": u.text, **asdict(u.voice)} for u in utts],
        "seconds": round(time.time() - t0, 1),
    }
    with open(out / "voices.json", "w") as f:
        json.dump(meta, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--num-train", type=int, default=12000)
    ap.add_argument("--num-dev", type=int, default=300)
    ap.add_argument("--num-test", type=int, default=150)
    ap.add_argument("--num-heldout", type=int, default=None, help="default: --num-test")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--vocab-size", type=int, default=200)
    ap.add_argument("--fp16-features", action="store_true",
                    help="store features as float16 .npy (half the size; only sensible with --cmvn "
                         "global: fairseq applies utterance_cmvn in the stored dtype)")
    ap.add_argument("--no-specaugment", action="store_true")
    ap.add_argument("--cmvn", choices=["utterance", "global"], default="utterance",
                    help="feature normalization in config.yaml (gcmvn.npz is written either way; "
                         "'global' makes config.yaml reference it by absolute path)")
    ap.add_argument("--no-festival", action="store_true", help="do not use festival voices")
    ap.add_argument("--install-deps", action="store_true", help="apt-get install missing synthesis tools")
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--eval-large", type=positive_int, nargs=2, metavar=("N_TEST", "N_HELDOUT"),
                    help="write only the large evaluation sets test_large and test_heldout_large "
                         "(sentences outside the shipped model's corpus of the same --seed; see BASE_NUM)")
    args = ap.parse_args(argv)
    check_deps(args.install_deps)

    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    voices = available_voices()
    if args.no_festival:
        voices.pop("festival", None)
    elif "festival" not in voices:
        print(f"make_corpus: no festival voices found: the corpus (sentences, voices, dictionary) differs from "
              f"the shipped model's, which was built with them; install {' '.join(FESTIVAL_PACKAGES)} "
              f"(--install-deps), or pass --no-festival to build without them on purpose", file=sys.stderr)
    if args.eval_large:
        num = dict(zip(LARGE_SPLITS, args.eval_large))
        utts = plan_eval_large(*args.eval_large, args.seed, voices, BASE_NUM)
        write_features(utts, out, LARGE_SPLITS, args, t0)
        write_voices(out, args, num, voices, utts, HELDOUT_LARGE, t0)
        return 0
    num = {"train": args.num_train, "dev": args.num_dev, "test": args.num_test,
           "test_heldout": args.num_test if args.num_heldout is None else args.num_heldout}
    utts = plan(num, args.seed, voices)
    # spm is trained on the training sentences plus a large grammar sample (the domain's
    # vocabulary, deterministic in the seed), so eval words are never <unk>.
    gr = random.Random(args.seed + 7)
    spm_texts = [u.text for u in utts if u.split == "train"] + [sentence(gr) for _ in range(20000)]
    spm_prefix = train_spm(spm_texts, out, args.vocab_size, args.seed)

    results = write_features(utts, out, SPLITS, args, t0)

    # global CMVN over training features (float64 accumulation)
    stats_split = "train" if num["train"] else "dev"
    s1 = np.zeros(80)
    s2 = np.zeros(80)
    n = 0
    for u in utts:
        if u.split != stats_split:
            continue
        f = np.load(io.BytesIO(results[u.uid][0])).astype(np.float64)
        s1 += f.sum(0)
        s2 += (f ** 2).sum(0)
        n += f.shape[0]
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 1e-8))
    np.savez(out / "gcmvn.npz", mean=mean.astype(np.float32), std=std.astype(np.float32))
    write_config(out, spm_prefix, cmvn=args.cmvn, specaugment=not args.no_specaugment)

    write_voices(out, args, num, voices, utts, HELDOUT, t0)
    frames = sum(v[1] for v in results.values())
    print(f"wrote {len(utts)} utterances ({frames / 100 / 3600:.2f} h) to {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
