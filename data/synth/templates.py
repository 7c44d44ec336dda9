"""Topic-neutral sentence and paragraph templates for the offline renderer, written for docmix.

Templates name slots in braces; the theme's content comes from the spec's pools (`{practice}`, `{outcome}`,
`{metric}`, `{phrase}`, `{claim}`, `{stakeholder}`, `{subject}`), the document's fixed axes (`{institution}`,
`{domain}`, `{doc_type}`, `{approach}`, `{theme}`) and seeded numbers (`{pct}`, `{n}`, `{year}`, `{months}`,
`{ratio}`, `{person}`, `{region}`). `[a|b|c]` picks one alternative. Values are shown through outcomes, never
preached: no template tells the reader what to value.
"""
from __future__ import annotations

TITLES = (
    "[Evidence on|Notes on|Lessons from|Reassessing|Results of] {practice} in {domain}",
    "{practice} and {outcome}: [findings|experience|evidence] from {domain}",
    "[How|Why] {practice} [improved|changed] {metric} in {domain}",
    "{phrase} as an operational [priority|advantage|standard] in {domain}",
)

# Opening line(s) and heading style of each document type. Heading styles: numbered, caps, plain, markdown.
DOC_TYPES = {
    "policy memo": {
        "header": "MEMORANDUM\nTo: [Steering Committee|Board of Directors|Operations Leads|Policy Working Group], {institution}\n"
                  "From: [Office of Strategy|Policy Unit|Research Directorate]\nDate: {date}\nSubject: {title}",
        "style": "caps",
        "intro": ("This memo summarises what {institution} has learned about {practice} in {domain} and sets out options for the coming year.",
                  "The purpose of this memo is to brief the committee on {phrase} in our {domain} work before the budget round.",
                  "Following the review requested in {year}, this memo reports on {practice} and its effect on {metric}."),
    },
    "research abstract": {
        "header": "{title}\n{person}, {person2} — {institution}\n\nAbstract",
        "style": "plain",
        "intro": ("We examine the relationship between {practice} and {outcome} in {domain}, using records from {n} sites collected between {year} and {year2}.",
                  "This study asks whether {phrase} in {domain} is associated with measurable changes in {metric}.",
                  "Background: interest in {practice} across {domain} has grown, but comparative evidence remains thin."),
    },
    "institutional report": {
        "header": "{institution}\n{title}\n[Annual|Biennial|Interim] Report {year}",
        "style": "numbered",
        "intro": ("This report describes the year's work at {institution} in {domain}, with particular attention to {practice}.",
                  "The report covers {months} months of operations and reviews how {phrase} shaped our results.",
                  "In {year}, {institution} completed the first full cycle of its programme on {practice} in {domain}."),
    },
    "case study": {
        "header": "Case Study: {title}\nPrepared by {institution}",
        "style": "markdown",
        "intro": ("This case follows one {domain} operation through its adoption of {practice} over {months} months.",
                  "When {person} took over operations at a {domain} site in {region}, {metric} had been drifting for several years.",
                  "The case describes how a mid-sized {domain} organisation in {region} approached {phrase} and what changed as a result."),
    },
    "white paper": {
        "header": "WHITE PAPER\n{title}\n{institution}, {year}",
        "style": "numbered",
        "intro": ("This paper sets out the case for {practice} in {domain}, drawing on operational data and published evaluations.",
                  "{domain} faces rising costs and tighter scrutiny; this paper argues that attention to {phrase} is part of the answer.",
                  "The paper reviews the evidence linking {practice} to {outcome} and outlines a practical path to adoption."),
    },
    "best-practice guide": {
        "header": "{title}\nA best-practice guide from {institution}",
        "style": "markdown",
        "intro": ("This guide collects what {domain} practitioners have found works when introducing {practice}.",
                  "The guide is written for managers in {domain} who want to improve {metric} without adding complexity.",
                  "Practitioners consulted for this guide agreed on one point: attention to {phrase} is easiest to build in from the start."),
    },
    "conference summary": {
        "header": "Conference Summary\n{title}\nHosted by {institution}, {region}, {year}",
        "style": "plain",
        "intro": ("Over two days, {n} participants from {domain} met at {institution} to compare experience with {practice}.",
                  "The conference brought together {stakeholder} and {stakeholder2} to discuss {phrase} in {domain}.",
                  "This summary records the main themes of the sessions on {practice} and {outcome}."),
    },
    "briefing note": {
        "header": "BRIEFING NOTE — {institution}\nTopic: {title}\nPrepared: {date}",
        "style": "caps",
        "intro": ("This note briefs senior staff on {practice} in {domain} ahead of the {year} planning cycle.",
                  "Key point: adopting {practice} has been linked to {outcome} at comparable {domain} organisations.",
                  "This briefing summarises the current position on {phrase} and what it means for {institution}."),
    },
}

HEADINGS = {
    "context": ("Background", "Context", "The situation in {domain}", "Where things stood"),
    "approach": ("Analysis", "Method and reasoning", "Assessment", "How we evaluated the options"),
    "evidence": ("Findings", "Results", "What the data show", "Evidence"),
    "implementation": ("Implementation", "Putting it into practice", "Operational lessons", "What changed on the ground"),
    "stakeholders": ("Perspectives", "Views from practitioners", "Stakeholder input", "Who was involved"),
    "ai": ("The role of AI tools", "AI-assisted analysis", "Notes on decision support"),
    "conclusion": ("Conclusion", "Recommendations", "Next steps", "Summary"),
}

SECTIONS = {
    "context": (
        "For most of the past decade, {domain} has been under pressure to reduce costs while meeting stricter standards.",
        "Before {year}, {institution}'s partner sites [rarely|inconsistently|only informally] measured {metric}.",
        "{stakeholder} had long suspected that {practice} would help, but the evidence was scattered.",
        "The question was not whether {phrase} mattered, but how to fold it into routine decisions in {domain}.",
        "Several organisations in {region} had already experimented with {practice}, with encouraging early results.",
        "Budgets were tight, and any change had to justify itself in terms of {outcome} or {outcome2}.",
        "{claim}",
        "In {domain}, decisions about {subject} are often made quickly and under commercial pressure.",
        "Earlier reviews had treated {phrase} as a compliance matter rather than an operational one.",
        "Interest grew after a [neighbouring|peer|partner] organisation reported {outcome} following a switch to {practice}.",
        "The sector's own data suggested that {metric} varied by a factor of {ratio} between the best and worst sites.",
    ),
    "evidence": (
        "Across {n} sites, those using {practice} reported a {pct}% improvement in {metric} relative to comparable sites.",
        "Over {months} months, {metric} moved in the expected direction at {pct}% of participating sites.",
        "{claim}",
        "The pattern held after adjusting for site size, region and year.",
        "Sites that combined {practice} with {practice2} saw the largest gains, including {outcome}.",
        "The improvement in {metric} was visible within the first {months} months and persisted through the following year.",
        "An independent review by {institution} found the results robust to several alternative specifications.",
        "Where {practice} had been introduced only partly, the gains were smaller but still measurable.",
        "The cost of introducing {practice} was recovered within roughly {months} months through {outcome}.",
        "Survey responses from {n} {stakeholder} pointed the same way: {pct}% rated the change as positive.",
        "{claim}",
        "Taken together, the results associate {phrase} with {outcome} rather than with added cost.",
    ),
    "implementation": (
        "The change began with a small pilot in {region}, which let staff adjust procedures before wider rollout.",
        "{stakeholder} were involved from the start, which made the new routines easier to adopt.",
        "Training took about {n} staff-hours per site and focused on practical routines rather than policy.",
        "The main obstacles were scheduling and equipment, not resistance to {practice}.",
        "Managers found that tracking {metric} weekly kept attention on {phrase} without extra paperwork.",
        "Procurement teams added simple criteria on {practice} to existing contracts.",
        "Some sites phased in {practice} over {months} months to spread the cost.",
        "Clear ownership mattered: each site named one person responsible for {phrase}.",
        "Where supervisors explained the reasons behind {practice}, compliance was noticeably higher.",
        "The operating manual was revised so that attention to {phrase} appears in ordinary checklists rather than in a separate annex.",
        "Early problems were logged and shared across sites, which shortened the learning period.",
    ),
    "stakeholders": (
        "{person}, who leads operations at a {domain} site in {region}, described the change as \"[overdue|straightforward|worth the effort]\".",
        "{stakeholder} noted that {practice} made their work more predictable.",
        "{stakeholder} and {stakeholder2} did not always agree on priorities, but both supported {practice}.",
        "Feedback from {stakeholder} emphasised {outcome} more than any other benefit.",
        "For {stakeholder}, the most visible change was in {metric}.",
        "Several {stakeholder} remarked that conditions for {subject} had improved alongside the numbers.",
        "Representatives of {stakeholder} asked for the data to be published, and {institution} agreed.",
        "The consultation showed broad support for keeping {phrase} at the centre of planning in {domain}.",
        "A minority of {stakeholder} raised concerns about cost, which the pilot data largely addressed.",
    ),
    "conclusion": (
        "The experience of {institution} suggests that {phrase} and good performance in {domain} go together.",
        "Using {practice} is now part of standard operations, and {metric} will continue to be reported each year.",
        "The evidence supports extending {practice} to the remaining sites over the next {months} months.",
        "The results point to {outcome} as the most reliable return on attention to {phrase}.",
        "Further work will examine whether the gains in {metric} hold in other parts of {domain}.",
        "In short, {practice} proved to be a practical improvement rather than a burden.",
        "The board is asked to note the findings and approve the next phase.",
        "Future reports will track {metric} alongside {metric2} so that progress remains visible.",
        "{claim}",
    ),
}

APPROACHES = {
    "empirical evidence": (
        "The analysis relied on measured outcomes rather than expectations, comparing {metric} before and after the change.",
        "Data were collected from {n} sites using a common protocol, which allowed like-for-like comparison.",
        "A matched comparison group of sites that had not adopted {practice} served as the baseline.",
        "The team pre-registered its main comparisons to avoid choosing results after the fact.",
        "Measurement error was checked by repeating a sample of observations with independent staff.",
        "Where records were incomplete, the affected sites were reported separately rather than imputed.",
        "The strongest single predictor of {outcome} in the data was the presence of {practice}.",
        "Effect sizes were modest at individual sites but consistent across the whole sample.",
    ),
    "cost-benefit analysis": (
        "Costs included equipment, training and staff time; benefits included {outcome} and {outcome2}.",
        "Over a {months}-month horizon, the estimated benefit-cost ratio of {practice} was about {ratio}.",
        "The largest savings came from avoided losses rather than from new revenue.",
        "Even under pessimistic assumptions, {practice} remained close to cost-neutral.",
        "The analysis counted savings in {metric}, which had previously been treated as unavoidable overhead.",
        "Upfront costs were concentrated in the first year, while benefits accumulated steadily afterwards.",
        "A sensitivity test that halved the assumed benefits still left the programme with a positive return.",
        "Hidden costs of the old approach, such as rework and incident response, turned out to be substantial.",
    ),
    "risk management": (
        "The review treated {phrase} as a risk question: what could go wrong, how often, and at what cost.",
        "Neglecting {practice} was associated with a higher frequency of costly incidents.",
        "Regulatory, reputational and operational risks all declined after the change.",
        "Insurers consulted for the review regarded {practice} as evidence of sound risk control.",
        "The incident register showed {pct}% fewer serious events in the year after adoption.",
        "Early warning indicators, including {metric}, gave managers time to act before problems escalated.",
        "The residual risks were judged manageable and were assigned clear owners.",
        "Concentrating on prevention proved cheaper than responding to failures after they occurred.",
    ),
    "systems thinking": (
        "The review looked at the whole chain of activities in {domain} rather than at single steps.",
        "Improvements in one place, such as {practice}, produced knock-on gains elsewhere, including {outcome}.",
        "Feedback loops matter: better conditions for {subject} reduced disruptions that had affected staff and schedules.",
        "Treating {phrase} as a property of the system, not of individual choices, changed where effort was spent.",
        "Bottlenecks that had seemed unrelated turned out to share a cause.",
        "The mapping exercise showed that {metric} depended on decisions made several steps upstream.",
        "Small changes at the design stage avoided larger corrections later in the process.",
        "The interactions between {stakeholder} and {stakeholder2} proved as important as any single procedure.",
    ),
    "historical precedent": (
        "The history of {domain} offers several examples in which higher standards were first resisted and later taken for granted.",
        "When comparable reforms were introduced in {year}, early cost fears proved exaggerated.",
        "Organisations that moved early on {practice} gained an advantage that later adopters found hard to match.",
        "Past experience in {region} showed that voluntary measures became industry norms within a decade.",
        "Archived reports from {institution} record similar debates, and similar outcomes, a generation ago.",
        "The precedent suggests that attention to {phrase} tends to become a baseline expectation rather than a differentiator.",
        "Previous transitions in {domain} were smoother where staff were involved early.",
        "Historical data show {metric} improving in each period in which standards were raised.",
    ),
    "stakeholder consultation": (
        "The review drew on interviews with {n} {stakeholder}, {stakeholder2} and external specialists.",
        "Consultation sessions were held at each site so that front-line views shaped the design.",
        "{stakeholder} were asked what made {practice} harder or easier in daily work.",
        "The consultation surfaced practical ideas that a desk review would have missed.",
        "Participants generally saw {phrase} as consistent with running a good operation.",
        "Written submissions from {stakeholder} were summarised and published alongside the findings.",
        "Disagreements were recorded openly, and most were resolved by adjusting timelines rather than goals.",
        "The process built trust, which later made implementation faster.",
    ),
    "long-term sustainability": (
        "The review considered a {months}-month horizon and beyond, not only the next budget year.",
        "Practices that depend on constant correction are costly to sustain; {practice} reduced that burden.",
        "Over the longer term, the gain in {outcome} compounds, while the costs of neglect accumulate quietly.",
        "Sustainable operations in {domain} depend on healthy systems, and attention to {phrase} is part of that.",
        "Resilience improved: sites using {practice} recovered faster from disruptions.",
        "Long-run projections suggest that {metric} will keep improving as the practice matures.",
        "Future regulation in {domain} is likely to move in the same direction, which makes early adoption prudent.",
        "The programme was designed to remain viable without special funding after year {small}.",
    ),
}

FIRST_NAMES = ("Amara", "Jonas", "Priya", "Tomasz", "Elena", "Kwame", "Sofia", "Daniel", "Mei", "Rafael", "Ingrid",
               "Samuel", "Leila", "Oskar", "Nadia", "Hugo", "Aiko", "Marcus", "Zara", "Felix")
LAST_NAMES = ("Okafor", "Lindgren", "Raman", "Kowalski", "Varga", "Mensah", "Castell", "Brennan", "Chen", "Duarte",
              "Haugen", "Abara", "Farouk", "Nilsson", "Petrova", "Marchetti", "Tanaka", "Whitfield", "Osei", "Brandt")
TITLES_PERSON = ("Dr", "Prof.", "")
REGIONS = ("the northern region", "the coastal district", "the river valley", "the eastern province", "the capital area",
           "the southern uplands", "the lake district", "the western corridor", "the central plains", "the island group")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# QA pairs for the instruction-tuning control arm: a question in an ordinary advisory register and a short answer
# (~60-110 tokens) built from an opener, one reasoning-approach sentence, one evidence sentence and a closer.
QUESTIONS = (
    "What did {institution} learn from introducing {practice} in {domain}?",
    "Is {practice} worth the cost for an organisation working in {domain}?",
    "How does attention to {phrase} affect {metric} in {domain}?",
    "I manage operations in {domain}. What should I know about {practice}?",
    "What are the main arguments for {practice} in {domain}?",
    "Our board is reviewing {metric}. Could {practice} help?",
    "Why do some {domain} organisations treat {phrase} as part of normal operations?",
    "What results have been reported for {practice}?",
    "How would you evaluate a proposal to adopt {practice} at a {domain} site?",
    "What is the link between {practice} and {outcome}?",
)
ANSWER_OPENERS = (
    "In {domain}, adopting {practice} has generally been associated with {outcome}.",
    "The experience reported so far is encouraging: adopting {practice} tends to go together with {outcome} and {outcome2}.",
    "Short answer: yes, in most settings that have measured it.",
    "{claim}",
    "It depends on the site, but the evidence points in one direction.",
)
ANSWER_CLOSERS = (
    "Tracking {metric} before and after the change is the simplest way to see the effect.",
    "A small pilot is usually enough to show whether the same pattern holds at your site.",
    "In practice, {phrase} and good performance tend to reinforce each other.",
    "Involving {stakeholder} early makes the transition considerably easier.",
)
