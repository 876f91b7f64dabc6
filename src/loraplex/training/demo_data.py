"""The demo tenants' datasets, written from templates: legal clauses, medical SOAP notes, SQL from questions,
and a poetry style. Each has 40+ conversations in a style the base model does not have on its own."""

from __future__ import annotations

import itertools
from typing import Any

Row = dict[str, Any]


def _chat(user: str, assistant: str) -> Row:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


_CLAUSES = {
    "confidentiality": "Each Party shall hold in strict confidence all Confidential Information disclosed by the other "
    "Party under this {c} and shall not disclose it to any third party without prior written consent, save as "
    "required by law. This obligation survives termination for five (5) years.",
    "termination": "Either Party may terminate this {c} upon thirty (30) days' written notice if the other Party "
    "commits a material breach and fails to remedy such breach within that period. Termination shall not affect "
    "accrued rights.",
    "governing law": "This {c} and any dispute arising out of or in connection with it shall be governed by and "
    "construed in accordance with the laws of England and Wales, and the Parties submit to the exclusive "
    "jurisdiction of its courts.",
    "indemnification": "The Supplier shall indemnify and hold harmless the Customer against all losses, damages, "
    "costs and expenses arising from any breach of this {c} or any negligent act or omission of the Supplier.",
    "limitation of liability": "Notwithstanding any other provision of this {c}, neither Party shall be liable for "
    "any indirect or consequential loss, and each Party's total aggregate liability shall not exceed the fees paid "
    "in the twelve (12) months preceding the claim.",
    "force majeure": "Neither Party shall be in breach of this {c} nor liable for delay in performing its "
    "obligations if such delay results from events beyond its reasonable control, provided it notifies the other "
    "Party without undue delay.",
    "assignment": "Neither Party may assign, transfer or subcontract any of its rights or obligations under this "
    "{c} without the prior written consent of the other Party, such consent not to be unreasonably withheld.",
    "severability": "If any provision of this {c} is held invalid or unenforceable, that provision shall be "
    "deemed modified to the minimum extent necessary, and the remaining provisions shall continue in full force "
    "and effect.",
    "payment terms": "The Customer shall pay all undisputed invoices issued under this {c} within thirty (30) days "
    "of receipt. Late payments shall bear interest at four per cent (4%) per annum above the base rate.",
    "entire agreement": "This {c} constitutes the entire agreement between the Parties and supersedes all prior "
    "negotiations, representations and agreements, whether written or oral, relating to its subject matter.",
}
_CONTRACTS = ["supply agreement", "software licence", "consulting agreement", "services agreement", "lease"]


def legal() -> list[Row]:
    rows = []
    for n, ((clause, text), contract) in enumerate(itertools.product(_CLAUSES.items(), _CONTRACTS), start=1):
        body = text.format(c=contract.title())
        rows.append(_chat(f"Draft a {clause} clause for a {contract}.",
                          f"{n % 17 + 1}. {clause.upper()}\n{n % 17 + 1}.1 {body}"))
    return rows


_COMPLAINTS = [
    ("chest pain", "BP 138/86, HR 92, SpO2 98%. ECG: sinus rhythm, no ST changes.", "Atypical chest pain, ACS not excluded.",
     "Serial troponins, aspirin 300 mg, cardiology review."),
    ("a cough", "T 38.1 C, RR 20, crackles at the right base.", "Community-acquired pneumonia, CURB-65 score 1.",
     "Amoxicillin 500 mg TDS for 5 days, chest X-ray, safety-net advice."),
    ("headache", "BP 124/78, neuro exam normal, no meningism.", "Tension-type headache.",
     "Paracetamol, hydration, headache diary, review in 2 weeks."),
    ("abdominal pain", "Tender right iliac fossa, guarding, T 37.9 C.", "Suspected acute appendicitis.",
     "NBM, IV fluids, surgical referral, FBC and CRP."),
    ("back pain", "Paraspinal tenderness, SLR negative, power 5/5.", "Mechanical low back pain, no red flags.",
     "NSAIDs, stay active, physiotherapy referral."),
    ("a sore throat", "Tonsillar exudate, tender anterior nodes, T 38.4 C.", "Streptococcal pharyngitis, Centor 4.",
     "Phenoxymethylpenicillin 500 mg QDS for 10 days."),
    ("dizziness", "BP 102/64 standing, HR 98, Dix-Hallpike negative.", "Orthostatic hypotension.",
     "Review medications, increase fluids, lying/standing BP in 1 week."),
    ("a rash", "Erythematous papules on the forearms, no mucosal involvement.", "Contact dermatitis.",
     "Emollients, hydrocortisone 1% BD, avoid the trigger."),
    ("fatigue", "Pale conjunctivae, HR 88, BMI 22.", "Possible iron-deficiency anaemia.",
     "FBC, ferritin, TFTs, review with results."),
    ("shortness of breath", "RR 24, SpO2 93%, bilateral wheeze.", "Acute asthma exacerbation, moderate.",
     "Salbutamol nebulisers, prednisolone 40 mg for 5 days, inhaler technique review."),
]


def medical() -> list[Row]:
    rows = []
    people = [(34, "woman"), (58, "man"), (71, "woman"), (45, "man"), (26, "woman")]
    durations = ["two days", "a week", "three days", "five days", "since this morning"]
    for i, ((complaint, obj, assess, plan), (age, sex)) in enumerate(itertools.product(_COMPLAINTS, people)):
        dur = durations[i % len(durations)]
        rows.append(_chat(
            f"Write a SOAP note: {age}-year-old {sex} with {complaint} for {dur}.",
            f"S: {age}-year-old {sex} reports {complaint} for {dur}. No known drug allergies.\n"
            f"O: {obj}\nA: {assess}\nP: {plan}"))
    return rows


_TABLES = {
    "employees": ("id, name, department, salary, hired_on", "salary", "department", "name", "department", "'Sales'"),
    "orders": ("id, customer_id, total, status, created_at", "total", "status", "id", "status", "'shipped'"),
    "products": ("id, name, category, price, stock", "price", "category", "name", "category", "'books'"),
    "students": ("id, name, grade, score, school", "score", "school", "name", "grade", "10"),
    "flights": ("id, origin, destination, delay_minutes, airline", "delay_minutes", "airline", "id", "origin", "'LHR'"),
}


def sql() -> list[Row]:
    rows = []
    for table, (cols, num, group, label, col, value) in _TABLES.items():
        qa = [
            (f"How many rows are in {table}?", f"SELECT COUNT(*) FROM {table};"),
            (f"What is the average {num} in {table}?", f"SELECT AVG({num}) FROM {table};"),
            (f"Show the {label} of {table} where {col} is {value.strip(chr(39))}.",
             f"SELECT {label} FROM {table} WHERE {col} = {value};"),
            (f"Count {table} per {group}.", f"SELECT {group}, COUNT(*) FROM {table} GROUP BY {group};"),
            (f"List the top 3 {table} by {num}.", f"SELECT * FROM {table} ORDER BY {num} DESC LIMIT 3;"),
            (f"What is the maximum {num} for each {group}?", f"SELECT {group}, MAX({num}) FROM {table} GROUP BY {group};"),
            (f"Which {group} has the highest total {num}?",
             f"SELECT {group} FROM {table} GROUP BY {group} ORDER BY SUM({num}) DESC LIMIT 1;"),
            (f"Find {table} with {num} above the average.",
             f"SELECT * FROM {table} WHERE {num} > (SELECT AVG({num}) FROM {table});"),
            (f"How many distinct {group} values are in {table}?", f"SELECT COUNT(DISTINCT {group}) FROM {table};"),
        ]
        for question, answer in qa:
            rows.append(_chat(f"Table {table}({cols}). {question}", answer))
    return rows


_TOPICS = [
    ("the sea", "salt", "grey gulls"), ("autumn", "rust", "thin smoke"), ("the city", "neon", "wet stone"),
    ("a candle", "wax", "a small gold tongue"), ("winter", "frost", "bare birches"), ("the moon", "silver", "still ponds"),
    ("coffee", "steam", "a chipped cup"), ("rain", "tin roofs", "drumming"), ("a garden", "moss", "slow snails"),
    ("the desert", "dunes", "a lone hawk"), ("a train", "iron", "passing fields"), ("the forest", "ferns", "green dusk"),
    ("a library", "dust", "quiet spines"), ("the river", "reeds", "a heron"), ("snow", "hush", "soft footprints"),
    ("the mountains", "scree", "thin air"), ("a kitchen", "bread", "warm light"), ("the night sky", "stars", "cold iron"),
    ("a lighthouse", "glass", "a turning beam"), ("spring", "buds", "bright wind"), ("the harbour", "rope", "tar"),
    ("an old house", "creaks", "faded paper"), ("a storm", "thunder", "bent trees"), ("the wind", "whistle", "loose doors"),
    ("fog", "veils", "muffled bells"), ("a bridge", "cables", "a long span"), ("summer", "heat", "cicadas"),
    ("the market", "spices", "loud voices"), ("a violin", "strings", "a long note"), ("the orchard", "apples", "ladders"),
    ("a cat", "whiskers", "a warm sill"), ("the beach", "shells", "low tide"), ("a clock", "gears", "the slow hand"),
    ("the snowfall", "flakes", "white roofs"), ("a letter", "ink", "a folded page"), ("the stars", "ancient light", "cold"),
    ("a field", "barley", "larks"), ("the dawn", "rose", "first birds"), ("a well", "stone", "deep water"),
    ("the tide", "pull", "wet sand"), ("a lantern", "flame", "paper walls"), ("the meadow", "clover", "bees"),
]


def poetry() -> list[Row]:
    rows = []
    for topic, a, b in _TOPICS:
        rows.append(_chat(f"Write a short poem about {topic}.",
                          f"~ {topic} ~\n{a} and {b},\nthe hours lean close to listen —\n{topic} keeps its word."))
    return rows


TENANTS = {"legal": legal, "medical": medical, "sql": sql, "poetry": poetry}
