"""Parallel sentences of the multilingual demo corpus: one short everyday sentence per row, in English (the
pivot), German, French and Spanish, written for this project. Rows keep their order: a sentence's id is its
position (``s01`` is the first row).

>>> len(SENTENCES) >= 36 and all(len(row) == len(LANGUAGES) for row in SENTENCES)
True
"""

from __future__ import annotations

#: The languages of :data:`SENTENCES`' columns; the first is the pivot.
LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es")

SENTENCES: tuple[tuple[str, str, str, str], ...] = (
    ("The cat is sleeping.", "Die Katze schläft.", "Le chat dort.", "El gato duerme."),
    ("I drink coffee every morning.", "Ich trinke jeden Morgen Kaffee.", "Je bois du café chaque matin.",
     "Bebo café cada mañana."),
    ("The sun is shining today.", "Heute scheint die Sonne.", "Le soleil brille aujourd'hui.", "Hoy brilla el sol."),
    ("Where is the train station?", "Wo ist der Bahnhof?", "Où est la gare ?", "¿Dónde está la estación?"),
    ("My brother plays the guitar.", "Mein Bruder spielt Gitarre.", "Mon frère joue de la guitare.",
     "Mi hermano toca la guitarra."),
    ("We are going to the beach.", "Wir gehen zum Strand.", "Nous allons à la plage.", "Vamos a la playa."),
    ("The book is on the table.", "Das Buch liegt auf dem Tisch.", "Le livre est sur la table.",
     "El libro está sobre la mesa."),
    ("It is very cold outside.", "Draußen ist es sehr kalt.", "Il fait très froid dehors.", "Hace mucho frío fuera."),
    ("She reads a newspaper.", "Sie liest eine Zeitung.", "Elle lit un journal.", "Ella lee un periódico."),
    ("The children play in the garden.", "Die Kinder spielen im Garten.", "Les enfants jouent dans le jardin.",
     "Los niños juegan en el jardín."),
    ("I would like a glass of water.", "Ich möchte ein Glas Wasser.", "Je voudrais un verre d'eau.",
     "Quiero un vaso de agua."),
    ("The dog barks at night.", "Der Hund bellt in der Nacht.", "Le chien aboie la nuit.",
     "El perro ladra por la noche."),
    ("Tomorrow we visit our grandmother.", "Morgen besuchen wir unsere Großmutter.",
     "Demain nous voyons notre grand-mère.", "Mañana visitamos a nuestra abuela."),
    ("The shop opens at nine.", "Der Laden öffnet um neun.", "Le magasin ouvre à neuf heures.",
     "La tienda abre a las nueve."),
    ("He forgot his umbrella.", "Er hat seinen Regenschirm vergessen.", "Il a oublié son parapluie.",
     "Olvidó su paraguas."),
    ("The soup is too hot.", "Die Suppe ist zu heiß.", "La soupe est trop chaude.", "La sopa está demasiado caliente."),
    ("I am learning to swim.", "Ich lerne schwimmen.", "J'apprends à nager.", "Estoy aprendiendo a nadar."),
    ("The bus is late again.", "Der Bus ist wieder zu spät.", "Le bus est encore en retard.",
     "El autobús llega tarde otra vez."),
    ("Please close the window.", "Bitte schließ das Fenster.", "Ferme la fenêtre, s'il te plaît.",
     "Cierra la ventana, por favor."),
    ("My phone is broken.", "Mein Handy ist kaputt.", "Mon téléphone est cassé.", "Mi teléfono está roto."),
    ("The bird sings in the tree.", "Der Vogel singt im Baum.", "L'oiseau chante dans l'arbre.",
     "El pájaro canta en el árbol."),
    ("We eat dinner at seven.", "Wir essen um sieben zu Abend.", "Nous dînons à sept heures.", "Cenamos a las siete."),
    ("The river is very long.", "Der Fluss ist sehr lang.", "La rivière est très longue.", "El río es muy largo."),
    ("Can you help me?", "Kannst du mir helfen?", "Peux-tu m'aider ?", "¿Puedes ayudarme?"),
    ("The apples are red.", "Die Äpfel sind rot.", "Les pommes sont rouges.", "Las manzanas son rojas."),
    ("My friend lives in the city.", "Mein Freund wohnt in der Stadt.", "Mon ami habite en ville.",
     "Mi amigo vive en la ciudad."),
    ("The film was very funny.", "Der Film war sehr lustig.", "Le film était très drôle.",
     "La película fue muy divertida."),
    ("I have two sisters.", "Ich habe zwei Schwestern.", "J'ai deux sœurs.", "Tengo dos hermanas."),
    ("The door is open.", "Die Tür ist offen.", "La porte est ouverte.", "La puerta está abierta."),
    ("It is raining in the mountains.", "In den Bergen regnet es.", "Il pleut dans les montagnes.",
     "Llueve en las montañas."),
    ("The teacher writes on the board.", "Der Lehrer schreibt an die Tafel.", "Le professeur écrit au tableau.",
     "El profesor escribe en la pizarra."),
    ("We need more bread.", "Wir brauchen mehr Brot.", "Il nous faut plus de pain.", "Necesitamos más pan."),
    ("The horse runs across the field.", "Das Pferd läuft über das Feld.", "Le cheval traverse le champ.",
     "El caballo corre por el campo."),
    ("I lost my keys.", "Ich habe meine Schlüssel verloren.", "J'ai perdu mes clés.", "Perdí mis llaves."),
    ("The flowers smell good.", "Die Blumen duften gut.", "Les fleurs sentent bon.", "Las flores huelen bien."),
    ("The car is in the garage.", "Das Auto ist in der Garage.", "La voiture est dans le garage.",
     "El coche está en el garaje."),
    ("She speaks three languages.", "Sie spricht drei Sprachen.", "Elle parle trois langues.",
     "Ella habla tres idiomas."),
    ("The milk is in the fridge.", "Die Milch ist im Kühlschrank.", "Le lait est dans le frigo.",
     "La leche está en la nevera."),
    ("Our house has a red roof.", "Unser Haus hat ein rotes Dach.", "Notre maison a un toit rouge.",
     "Nuestra casa tiene un tejado rojo."),
    ("The baby is laughing.", "Das Baby lacht.", "Le bébé rit.", "El bebé se ríe."),
    ("I walk to work.", "Ich gehe zu Fuß zur Arbeit.", "Je vais au travail à pied.", "Voy al trabajo a pie."),
    ("The moon is bright tonight.", "Der Mond ist heute Nacht hell.", "La lune brille ce soir.",
     "La luna brilla esta noche."),
)
